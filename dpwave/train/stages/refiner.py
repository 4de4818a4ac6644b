"""The refiner stage (public, dpwave only): the model of the fine wavelet bands given the coarse band, trained
on the public split."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import optax
from flax import nnx

from dpwave import data
from dpwave.models import refiner as refiner_lib
from dpwave.train import loop, steps
from dpwave.train.fingerprints import jsonable
from dpwave.train.settings import Settings
from dpwave.train.stages.base import Context, Stage, public_task, restore_state, training_inputs


class Refiner(Stage):
    name = "refiner"
    public = True
    stream = 4

    def inputs(self, settings: Settings) -> dict[str, Any]:
        return {"seed": settings.seed, "data.public": jsonable(settings.data.specs["public"]),
                **training_inputs(self.name, settings.refiner)}

    def init(self, settings: Settings) -> tuple[nnx.GraphDef, steps.TrainState, optax.GradientTransformation]:
        """(graphdef, initial train state, optimizer)."""
        cfg = settings.refiner
        graphdef, params = nnx.split(refiner_lib.Refiner(cfg.model, rngs=nnx.Rngs(params=self.key(settings))),
                                     nnx.Param)
        optimizer = refiner_lib.make_optimizer(cfg.learning_rate, max(cfg.steps, 1))
        return graphdef, steps.TrainState(params, optimizer.init(params)), optimizer

    def restore_params(self, settings: Settings, stage_dir: str) -> nnx.State:
        return restore_state(stage_dir, self.init(settings)[1]).params

    def model(self, settings: Settings, stage_dir: str) -> refiner_lib.Refiner:
        """The trained refiner of `stage_dir`."""
        return nnx.merge(self.init(settings)[0], self.restore_params(settings, stage_dir))

    def build(self, ctx: Context) -> loop.Task:
        settings = ctx.settings
        cfg = settings.refiner
        source = settings.data.load("public")
        data.require_public(source, "refiner training")
        graphdef, state, optimizer = self.init(settings)
        with_label = cfg.model.num_classes is not None

        def get_batch(indices):
            raw = source.get_batch(indices)
            out = {"image": raw["image"]}  # uint8; the refiner converts to [-1, 1]
            if with_label:
                out["label"] = np.asarray(raw["label"], np.int32)
            return out

        return public_task(self, ctx, state, optimizer, functools.partial(refiner_lib.refiner_loss, graphdef), cfg,
                           len(source), get_batch)


STAGE = Refiner()
