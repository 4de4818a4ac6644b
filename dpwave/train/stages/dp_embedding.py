"""The DP-MERF release stage (private): the only stage of the DP-MERF methods that reads private data.

It sums every private example's random-feature embedding (`privacy.mean_embedding`, each clipped to L2 norm 1),
adds the Gaussian noise of the mechanism once and divides by N: one step of q = 1 and C = 1 of the same mechanism
object, ledger, budget guard and statement as DP-SGD (`DpAccount`). The released embedding is the stage's state,
checkpointed with the ledger: a rerun after the release restores it and spends nothing more.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from dpwave.privacy import mean_embedding
from dpwave.train import loop, merf
from dpwave.train.fingerprints import jsonable
from dpwave.train.settings import Settings
from dpwave.train.stages.base import Context, Stage, restore_state
from dpwave.train.stages.dp_account import DpAccount


# The config.dp settings the release depends on (`l2_clip`, `expected_batch_size` and `steps` are DP-SGD's). They may
# change on resume: the ledger refuses them unless dp.operations.compose_on_resume composes them honestly.
RELEASE_SETTINGS = ("target_epsilon", "delta", "noise_multiplier", "accountant", "neighboring", "allow_large_delta",
                    "tuning", "tuning_private_size")


def template(settings: Settings) -> mean_embedding.Embedding:
    """A zero embedding of the released shapes (the checkpoint's template)."""
    k = merf.num_classes(settings)
    return {"counts": jnp.zeros((k,), jnp.float32),
            "embedding": jnp.zeros((k, settings.merf.num_features), jnp.float32)}


class Release(DpAccount):
    """One DP-MERF release: the private set, the features, the mechanism (q = 1), its ledger and guard."""

    def __init__(self, settings: Settings, stage_dir: str):
        super().__init__(settings, stage_dir, release="mean_embedding", single_release=True)
        self.features = merf.features(settings)

    def meta(self) -> dict:
        return {"ledger": self.ledger.to_dict()}

    def on_restore(self, meta: dict) -> None:
        self.use_ledger(self.saved_ledger(meta)[0])

    def train(self, stage_loop: loop.StageLoop) -> loop.LoopResult:
        """The release as a loop of one step (so a finished release is never redone and a rerun resumes it)."""
        with stage_loop:
            released, step = stage_loop.restore(template(self.settings), self.on_restore)
            for i, _ in stage_loop.batches(lambda i: None, 1):
                try:
                    self.before_step(i)  # the ledger holds no step and the budget allows the release
                except loop.StopStage as stop:
                    stage_loop.stop_early(i, str(stop))
                    break
                total = merf.embedding_sum(self.settings, self.features, self.source)  # each example's norm <= 1
                released = mean_embedding.release(total, self.mechanism.noise(*self.secret.noise_keys()))
                self.ledger.record_steps(1)
                step, self.last_epsilon = 1, self.ledger.epsilon()
                if stage_loop.end_step(1, released, {}, meta=self.meta, extra={"epsilon": self.last_epsilon}):
                    return stage_loop.result
            return stage_loop.finish(released, step, released, meta=self.meta, summary_extra=self.summary())


class DpEmbedding(Stage):
    """`stream` is None: the noise comes from the DP secret seed; the features from config.seed (public)."""

    name = "dp_embedding"
    public = False
    stream = None
    dp = True
    reconciled_on_resume = tuple(f"dp.{name}" for name in RELEASE_SETTINGS)

    def enabled(self, settings: Settings) -> bool:
        return not settings.public_only

    def inputs(self, settings: Settings) -> dict[str, Any]:
        dp, d = settings.dp, settings.data
        m = settings.merf  # the generator's settings are the next stage's: changing them keeps the release
        return {"seed": settings.seed, "method": settings.method,
                "merf": {"num_features": m.num_features, "count_weight": m.count_weight,
                         "length_scale": m.length_scale},
                "wavelet": jsonable(settings.wavelet),
                "data": {"private": jsonable(d.specs["private"]), "public": jsonable(d.specs["public"]),
                         "num_classes": d.num_classes},
                "dp": {**{k: v for k, v in jsonable(dp.mechanism).items() if k in RELEASE_SETTINGS},
                       "secret_seed": dp.secret.seed}}

    def train(self, ctx: Context) -> loop.LoopResult:
        return Release(ctx.settings, ctx.dir(self.name)).train(ctx.stage_loop(self))

    def restore(self, settings: Settings, stage_dir: str) -> mean_embedding.Embedding:
        """The released (noised, normalized) embedding."""
        return restore_state(stage_dir, template(settings))


STAGE = DpEmbedding()
