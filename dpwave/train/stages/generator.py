"""The DP-MERF generator stage: a generator fitted to the released embedding, without any further access to the
private data (post-processing of the release). In the public-only control (dp.mechanism.target_epsilon = 0) it is
fitted to the public split's own embedding instead (no noise, no private data).

Each step generates `merf.batch_size` images with balanced class labels and takes one Adam step on DP-MERF's
objective (`mean_embedding.embedding_loss`), data-parallel across devices (each device's shard estimates the
class means of its own images).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax
from flax import nnx

from dpwave import data
from dpwave.models import merf_generator
from dpwave.privacy import mean_embedding
from dpwave.train import distributed, loop, merf, steps
from dpwave.train.fingerprints import jsonable
from dpwave.train.settings import Settings
from dpwave.train.stages.base import Context, Stage, restore_state
from dpwave.train.stages.dp_embedding import STAGE as DP_EMBEDDING


def config(settings: Settings) -> merf_generator.GeneratorConfig:
    m = settings.merf
    return merf_generator.GeneratorConfig(merf.out_shape(settings), merf.num_classes(settings), code_dim=m.code_dim,
                                          hidden=m.hidden)


def public_embedding(settings: Settings,
                     feats: mean_embedding.RandomFeatures) -> tuple[mean_embedding.Embedding, int]:
    """The public split's mean embedding and size (the public-only control's target): no noise, no private data."""
    source = settings.data.load("public")
    data.require_public(source, "the public-only DP-MERF control")
    return jax.tree.map(lambda x: x / len(source), merf.embedding_sum(settings, feats, source)), len(source)


class Generator(Stage):
    """Not public: it is fitted to the DP release (post-processing, but of private data)."""

    name = "generator"
    public = False
    stream = 8
    consumes = ("dp_embedding",)

    def inputs(self, settings: Settings) -> dict[str, Any]:
        d = settings.data
        return {"seed": settings.seed, "method": settings.method, "mode": settings.mode,
                "merf": jsonable(settings.merf), "wavelet": jsonable(settings.wavelet),
                "data": {"public": jsonable(d.specs["public"]), "num_classes": d.num_classes}}

    def init(self, settings: Settings) -> tuple[nnx.GraphDef, steps.TrainState, optax.GradientTransformation]:
        """(graphdef, initial train state, optimizer)."""
        model = merf_generator.MerfGenerator(config(settings), rngs=nnx.Rngs(params=self.key(settings)))
        graphdef, params = nnx.split(model, nnx.Param)
        optimizer = optax.adam(settings.merf.learning_rate)
        return graphdef, steps.TrainState(params, optimizer.init(params)), optimizer

    def restore_params(self, settings: Settings, stage_dir: str) -> tuple[nnx.GraphDef, nnx.State]:
        graphdef, state, _ = self.init(settings)
        return graphdef, restore_state(stage_dir, state).params

    def build(self, ctx: Context) -> loop.Task:
        settings, mesh, m = ctx.settings, ctx.mesh, ctx.settings.merf
        feats = merf.features(settings)
        if settings.public_only:
            released, n = public_embedding(settings, feats)
        else:  # the release and its N (public: written in the privacy statement); no private data is opened
            released = DP_EMBEDDING.restore(settings, ctx.dir(DP_EMBEDDING.name))
            n = loop.read_summary(ctx.dir(DP_EMBEDDING.name))["privacy"]["dataset_size"]
        means, proportions = mean_embedding.class_targets(released, m.count_weight, n)
        graphdef, state, optimizer = self.init(settings)
        state = distributed.replicate(state, mesh)
        frequencies = feats.frequencies

        def loss_fn(params, labels, rng):
            images = merf_generator.generate(graphdef, params, labels, rng)
            loss = mean_embedding.embedding_loss(mean_embedding.RandomFeatures(frequencies),
                                                 images, labels, means, proportions)
            return loss, {}

        step_fn = steps.public_step(loss_fn, optimizer, mesh)
        labels = np.arange(m.batch_size, dtype=np.int32) % merf.num_classes(settings)
        key = self.key(settings)

        def step(state, batch, i):
            return step_fn(state, distributed.shard_batch(batch, mesh), jax.random.fold_in(key, i))

        return loop.Task(self.name, state, step, m.steps, params_of=lambda s: s.params,
                         batch=lambda i: labels[distributed.local_slice(np.arange(len(labels)))])

    def task(self, ctx: Context) -> loop.Task:
        """Its inputs are public settings and a DP release: its files and timing need not be owner-only."""
        task = super().task(ctx)
        task.private = False
        return task


STAGE = Generator()
