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
from dpwave.train import loop, merf, model_io
from dpwave.train.fingerprints import jsonable
from dpwave.train.settings import Settings
from dpwave.train.stages.base import Context, Stage
from dpwave.train.stages.dp_account import DpAccount


# The config.dp settings the release depends on (`l2_clip`, `expected_batch_size` and `steps` are DP-SGD's). They may
# change on resume: the ledger refuses them unless dp.compose_on_resume composes them honestly.
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

    def step(self, state: Any, batch: None, i: int) -> tuple[mean_embedding.Embedding, dict]:
        total = merf.embedding_sum(self.settings, self.features, self.source)
        released = mean_embedding.release(total, self.mechanism.noise(*self.secret.noise_keys()))
        self.ledger.record_steps(1)
        return released, {}

    def after_step(self, i: int) -> dict:
        self.last_epsilon = self.ledger.epsilon()
        return {"epsilon": self.last_epsilon}

    def on_restore(self, meta: dict) -> None:
        self.use_ledger(self.saved_ledger(meta)[0])

    def task(self) -> loop.Task:
        return loop.Task(DpEmbedding.name, template(self.settings), self.step, 1, params_of=lambda s: s,
                         meta=lambda: {"ledger": self.ledger.to_dict()}, on_restore=self.on_restore,
                         before_step=self.before_step, after_step=self.after_step, summary_extra=self.summary,
                         private=True)


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
                       "secret_seed": dp.secret_seed}}

    def build(self, ctx: Context) -> loop.Task:
        return Release(ctx.settings, ctx.dir(self.name)).task()

    def restore(self, settings: Settings, stage_dir: str) -> mean_embedding.Embedding:
        """The released (noised, normalized) embedding."""
        return model_io.restore_state(stage_dir, template(settings))


STAGE = DpEmbedding()
