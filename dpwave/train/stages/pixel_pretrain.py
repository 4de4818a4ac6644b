"""The pixel model's pretraining stage (public; method dp_diffusion): the flow-matching U-Net on the public
split's images (`dpwave.models.pixel_flow`)."""

from __future__ import annotations

from typing import Any

import numpy as np
import optax
from flax import nnx

from dpwave import data
from dpwave.models import pixel_flow
from dpwave.train import loop, steps
from dpwave.train.fingerprints import jsonable
from dpwave.train.settings import Settings
from dpwave.train.stages.base import Context, Stage, public_task, restore_state, training_inputs


def pixel_examples(settings: Settings, source: data.Source) -> dict[str, np.ndarray]:
    """Every image of `source` as float32 [-1, 1] NHWC, with int32 labels (zeros without label conditioning)."""
    batch = source.get_batch(np.arange(len(source)))
    labels = batch["label"] if settings.data.condition == "label" else np.zeros(len(source))
    return {"image": data.to_float(batch["image"]).astype(np.float32), "label": np.asarray(labels, np.int32)}


class PixelPretrain(Stage):
    name = "pixel_pretrain"
    public = True
    stream = 9

    def inputs(self, settings: Settings) -> dict[str, Any]:
        return {"seed": settings.seed, "data.public": jsonable(settings.data.specs["public"]),
                **training_inputs("diffusion", settings.diffusion)}

    def init(self, settings: Settings) -> tuple[nnx.GraphDef, steps.TrainState, optax.GradientTransformation]:
        """(graphdef, initial train state, optimizer)."""
        model = pixel_flow.PixelFlow(settings.diffusion.model, rngs=nnx.Rngs(params=self.key(settings)))
        graphdef, params = nnx.split(model, nnx.Param)
        optimizer = optax.adamw(settings.diffusion.learning_rate, weight_decay=1e-4)
        return graphdef, steps.TrainState(params, optimizer.init(params)), optimizer

    def restore_params(self, settings: Settings, stage_dir: str) -> nnx.State:
        return restore_state(stage_dir, self.init(settings)[1]).params

    def build(self, ctx: Context) -> loop.Task:
        settings = ctx.settings
        source = settings.data.load("public")
        data.require_public(source, "the pixel model's pretraining")
        examples = pixel_examples(settings, source)
        graphdef, state, optimizer = self.init(settings)

        def loss_fn(params, batch, rng):
            return pixel_flow.batch_loss(graphdef, params, batch, rng), {}

        return public_task(self, ctx, state, optimizer, loss_fn, settings.diffusion, len(source),
                           lambda idx: {k: v[idx] for k, v in examples.items()}, section="diffusion")


STAGE = PixelPretrain()
