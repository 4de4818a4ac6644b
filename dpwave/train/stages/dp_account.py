"""The privacy side of a DP stage (DP-SGD finetuning, the DP-MERF release): the secret seed, the DP input, the
mechanism, the ledger, the budget guard and the summary that reports them."""

from __future__ import annotations

from absl import logging

from dpwave import data, privacy
from dpwave.train import loop, secret_seed
from dpwave.train.settings import Settings, expected_privacy


class DpAccount:
    """The privacy side of a DP stage: its secret seed, its DP input (`source`), mechanism, ledger and budget
    guard, and the summary that reports them. `release`: the statement's words for the mechanism
    (`privacy.RELEASES`); `single_release`: one step of q = 1 (the DP-MERF release) instead of DP-SGD's."""

    def __init__(self, settings: Settings, stage_dir: str, *, release: str = "dp_sgd", single_release: bool = False):
        self.settings = settings
        dp = settings.dp
        self.secret, origin = secret_seed.secret_seed(dp, stage_dir)
        self.seed_origin = f"{origin}, {self.secret.bits} bits"
        self.source = settings.data.load("private")
        expected = expected_privacy("private", dp.mechanism.tuning)  # the tag its spec passed, now of the data read
        if self.source.privacy != expected:
            raise data.PrivacyError(f"the DP stage expects config.data.private to be tagged {expected}"
                                    f"{' (dp.mechanism.tuning)' if dp.mechanism.tuning else ''}, got "
                                    f"{self.source.privacy}")
        self.mechanism = dp.mechanism.build(len(self.source), single_release)
        self.ledger = self.mechanism.ledger()
        self.guard = self.mechanism.guard(self.ledger)
        self.release = release
        self.last_epsilon = 0.0

    def before_step(self, i: int) -> None:
        if self.ledger.steps != i:
            raise RuntimeError(f"privacy ledger holds {self.ledger.steps} steps but the run is at step {i}")
        if self.guard is not None and not self.guard.can_step(1):
            raise loop.StopStage(f"privacy budget: one more step would exceed epsilon "
                                 f"{self.mechanism.params.target_epsilon} (now {self.ledger.epsilon():.4g})")

    def saved_ledger(self, meta: dict) -> tuple[privacy.PrivacyLedger, list[str]]:
        """The checkpoint's ledger and how its DP hyperparameters differ from this run's (refused unless
        `dp.operations.compose_on_resume`, then composed honestly)."""
        saved = privacy.PrivacyLedger.from_dict(meta["ledger"])
        differences = saved.check_compatible(self.mechanism.params,
                                             compose=self.settings.dp.operations.compose_on_resume)
        if differences:
            logging.warning("DP hyperparameters changed on resume and are composed honestly: %s", differences)
        return saved, differences

    def use_ledger(self, ledger: privacy.PrivacyLedger) -> None:
        self.ledger = ledger
        self.guard = self.mechanism.guard(self.ledger)

    def summary(self) -> dict:
        report, params = privacy.privacy_report(self.ledger, release=self.release), self.mechanism.params
        return {"epsilon": self.ledger.epsilon(), "delta": params.delta,
                "noise_multiplier": params.noise_multiplier, "sampling_prob": params.sampling_prob,
                "steps": self.ledger.steps, "privacy": {**report, "seed": self.seed_origin},
                "statement": (privacy.privacy_statement(self.ledger, release=self.release)
                              + f"\n  sampling and noise seed: {self.seed_origin}"),
                "ledger": self.ledger.to_dict()}
