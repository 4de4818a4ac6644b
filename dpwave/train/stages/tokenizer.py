"""The tokenizer stage (public): the per-scale VQ tokenizer of the wavelet bands, trained on the public split."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import optax
from flax import nnx

from dpwave import data
from dpwave.models import tokenizer as tokenizer_lib
from dpwave.train import distributed, loop, streams
from dpwave.train.fingerprints import jsonable
from dpwave.train.settings import Settings
from dpwave.train.stages.base import Context, Stage, init_source, restore_state, training_inputs


class Tokenizer(Stage):
    name = "tokenizer"
    public = True
    stream = 1

    def inputs(self, settings: Settings) -> dict[str, Any]:
        return {"seed": settings.seed, "data.public": jsonable(settings.data.specs["public"]),
                **training_inputs(self.name, settings.tokenizer)}

    def init(self, settings: Settings) -> tuple[nnx.GraphDef, Any, optax.GradientTransformation]:
        """(graphdef, initial train state, optimizer)."""
        cfg = settings.tokenizer
        model = tokenizer_lib.SpectralTokenizer(cfg.model, rngs=nnx.Rngs(params=self.key(settings)))
        optimizer = tokenizer_lib.make_optimizer(cfg.learning_rate, max(cfg.steps, 1))
        graphdef, state = tokenizer_lib.init_train_state(model, optimizer)
        return graphdef, state, optimizer

    def restore_params(self, settings: Settings, stage_dir: str) -> tuple[nnx.State, nnx.State]:
        """The trained model's state: (parameters, codebook statistics)."""
        state = restore_state(stage_dir, self.init(settings)[1])
        return state.params, state.stats

    def model(self, settings: Settings, stage_dir: str) -> tokenizer_lib.SpectralTokenizer:
        """The trained tokenizer of `stage_dir`."""
        return nnx.merge(self.init(settings)[0], *self.restore_params(settings, stage_dir))

    def build(self, ctx: Context) -> loop.Task:
        settings, mesh = ctx.settings, ctx.mesh
        cfg = settings.tokenizer
        source = settings.data.load("public")
        data.require_public(source, "tokenizer training")
        graphdef, state, optimizer = self.init(settings)
        if cfg.init_params_from:
            params, stats = self.restore_params(settings, init_source(cfg.init_params_from, self.name)[0])
            state = dataclasses.replace(state, params=params, stats=stats)
        state = distributed.replicate(state, mesh)
        sampler = streams.shuffled(settings.seed, self.stream, len(source), cfg.batch_size, self.name)
        step_fn = jax.jit(functools.partial(tokenizer_lib.train_step, graphdef, optimizer=optimizer), donate_argnums=0)
        key = self.key(settings)

        def batch(i):
            return data.to_float(source.get_batch(distributed.local_slice(sampler.batch(i)))["image"])

        def step(state, images, i):
            return step_fn(state, distributed.shard_batch(images, mesh), jax.random.fold_in(key, i))

        return loop.Task(self.name, state, step, cfg.steps, params_of=lambda s: s.params, batch=batch)


STAGE = Tokenizer()
