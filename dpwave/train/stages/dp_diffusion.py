"""The pixel model's DP finetuning stage (private; method dp_diffusion): the public-pretrained flow-matching
U-Net DP-SGD finetuned on the private images with the same mechanism, sampler, ledger and step as the
transformer's DP stage (`DpSgdRun`). Each example's noise level and noise come from its own content key, so
the clipped sum's sensitivity holds (docs/privacy.md)."""

from __future__ import annotations

from typing import Any

from flax import nnx
from jax.sharding import Mesh

from dpwave.models import pixel_flow
from dpwave.train import loop, steps
from dpwave.train.fingerprints import jsonable
from dpwave.train.settings import Settings
from dpwave.train.stages.base import Context, Stage, restore_state
from dpwave.train.stages.dp_finetune import DP_SGD_RECONCILED, DpSgdRun, state_template
from dpwave.train.stages.pixel_pretrain import STAGE as PIXEL_PRETRAIN
from dpwave.train.stages.pixel_pretrain import pixel_examples


class DiffusionRun(DpSgdRun):
    def __init__(self, settings: Settings, mesh: Mesh, *, stage_dir: str, pretrain_dir: str):
        super().__init__(settings, stage_dir)
        graphdef = PIXEL_PRETRAIN.init(settings)[0]
        params = PIXEL_PRETRAIN.restore_params(settings, pretrain_dir)

        def example_loss(params, example, key):  # the recipe's condition dropout, when set, as the DP transformer's
            return pixel_flow.example_loss(graphdef, params, example, key, settings.dp.recipe.cond_dropout)

        self.build(mesh, pixel_examples(settings, self.source), params, None, example_loss)


class DpDiffusion(Stage):
    """`stream` is None: the stage's randomness comes from the DP secret seed, never from config.seed."""

    name = "dp_diffusion"
    public = False
    stream = None
    dp = True
    consumes = ("pixel_pretrain",)
    reconciled_on_resume = DP_SGD_RECONCILED

    def enabled(self, settings: Settings) -> bool:
        return not settings.public_only

    def inputs(self, settings: Settings) -> dict[str, Any]:
        dp = settings.dp
        return {"data.private": jsonable(settings.data.specs["private"]),
                "diffusion.model": jsonable(settings.diffusion.model),
                "dp": {**jsonable(dp.mechanism), **jsonable(dp.recipe), "secret_seed": dp.secret.seed}}

    def train(self, ctx: Context) -> loop.LoopResult:
        return DiffusionRun(ctx.settings, ctx.mesh, stage_dir=ctx.dir(self.name),
                            pretrain_dir=ctx.dir(PIXEL_PRETRAIN.name)).train(ctx.stage_loop(self))

    def restore_params(self, settings: Settings, stage_dir: str) -> tuple[nnx.GraphDef, nnx.State]:
        """The DP-finetuned parameters (their EMA when `dp.recipe.ema_decay` > 0)."""
        graphdef, initial, _ = PIXEL_PRETRAIN.init(settings)
        state: steps.TrainState = restore_state(stage_dir, state_template(settings, initial.params, None))
        return graphdef, state.extra if settings.dp.recipe.ema_decay else state.params


STAGE = DpDiffusion()
