"""The AR pretraining stage (public): the transformer over the public split's tokens (the coarse band for dpwave
and bicubic, every scale for full_dp), under the frozen tokenizer."""

from __future__ import annotations

from typing import Any

import optax
from flax import nnx

from dpwave import data
from dpwave.models import transformer as transformer_lib
from dpwave.train import ar_examples, loop, steps
from dpwave.train.fingerprints import jsonable
from dpwave.train.settings import Settings
from dpwave.train.stages.base import Context, Stage, public_task, restore_state, training_inputs
from dpwave.train.stages.tokenizer import STAGE as TOKENIZER


class Pretrain(Stage):
    name = "pretrain"
    public = True
    stream = 2
    consumes = ("tokenizer",)

    def inputs(self, settings: Settings) -> dict[str, Any]:
        return {"seed": settings.seed, "data.public": jsonable(settings.data.specs["public"]),
                "transformer": jsonable(settings.transformer), **training_inputs(self.name, settings.pretrain)}

    def init(self, settings: Settings) -> tuple[nnx.GraphDef, steps.TrainState, optax.GradientTransformation]:
        """(graphdef, initial train state, optimizer)."""
        graphdef, params = ar_examples.init_transformer(settings.transformer, self.key(settings))
        optimizer = optax.adamw(settings.pretrain.learning_rate, weight_decay=1e-4)
        return graphdef, steps.TrainState(params, optimizer.init(params)), optimizer

    def restore_params(self, settings: Settings, stage_dir: str) -> nnx.State:
        return restore_state(stage_dir, self.init(settings)[1]).params

    def build(self, ctx: Context) -> loop.Task:
        settings = ctx.settings
        source = settings.data.load("public")
        data.require_public(source, "AR pretraining")
        examples = ar_examples.encode_examples(settings, TOKENIZER.model(settings, ctx.dir(TOKENIZER.name)), source)
        graphdef, state, optimizer = self.init(settings)

        def loss_fn(params, batch, rng):
            return transformer_lib.batch_loss(graphdef, params, batch, rng), {}

        return public_task(self, ctx, state, optimizer, loss_fn, settings.pretrain, len(source),
                           lambda idx: {k: v[idx] for k, v in examples.items()})


STAGE = Pretrain()
