"""The DP mechanism of a run, built once from its settings (in the spirit of jax_privacy's `DPExecutionPlan`).

`DpSgdMechanism` is one DP-SGD step repeated: Poisson batch selection, the sum of per-example gradients
clipped to L2 norm C, Gaussian noise of std sigma * C added once to that sum and normalized by the expected
batch size, and the `DpEvent` of that step. Everything in it is public; the secret seed enters only where
randomness is drawn (the sampler's draws, the noise key), so the object can be built, logged and compared
before any private data is read. The DP stage, the ledger (`params`), the budget guard (`guard`) and the
statement (through the ledger) all read the same object.

Its L2 sensitivity is C when one example is added or removed, 2 C when one is replaced (each example's key depends
on that example only, `dpwave.privacy.keys`); `params.step_event()` is the `DpEvent` the ledger composes once per
step. A new mechanism (fixed-size batches, correlated noise) is a new class with the same members: `selection`,
`clipped_sum`, `noise`, `optimizer`, `ledger`, `guard` and `params`;
`dpwave/train/settings.py` (`Mechanism.build`) chooses it from the config.

Library pieces: the step's event is dp-accounting's (`PoissonSampledDpEvent` of a `GaussianDpEvent`); sigma
comes from `accounting.calibrate_noise`, not dp-accounting's generic `calibrate_dp_mechanism` (same bisection,
without the guarantee of landing within 1% below the target); `optax.microbatching.microbatch` is not used for
the microbatches because it needs their size to divide the batch, while `clipping.clipped_grad` pads the Poisson
bucket with masked rows inside its own scan (whose summation order the pinned run's digests fix).
"""

from __future__ import annotations

import dataclasses

import jax
import optax

from dpwave.privacy import clipping
from dpwave.privacy.batch_selection import PoissonSelection
from dpwave.privacy.guard import BudgetGuard
from dpwave.privacy.ledger import DpParams, PrivacyLedger
from dpwave.privacy.noise import noise_and_normalize
from dpwave.validation import check_number


@dataclasses.dataclass(frozen=True)
class DpSgdMechanism:
    """Poisson-subsampled Gaussian DP-SGD with per-example clipping to `l2_clip` over the whole trainable tree.

    `params` holds what the accountant and the ledger need (sigma, q, delta, accountant, N, target, relation).
    """

    l2_clip: float
    params: DpParams

    def __post_init__(self) -> None:
        check_number("l2_clip", self.l2_clip, positive=True)
        if self.params.dataset_size is None:
            raise ValueError("a DP-SGD mechanism needs params.dataset_size (q N normalizes the noised sum)")
        object.__setattr__(self, "l2_clip", float(self.l2_clip))

    @property
    def selection(self) -> PoissonSelection:
        """Each example joins each step with probability q; its q N normalizes the noised sum."""
        return self.params.selection

    def clipped_sum(self, loss_fn: clipping.LossFn, *, microbatch_size: int | None = None,
                    trainable: clipping.Trainable = None, use_ghost_norms: bool = False) -> clipping.ClippedGradFn:
        """`fn(params, batch, mask, keys) -> (sum of clipped grads, ClipAux)` (`clipping.clipped_grad`).

        `microbatch_size` and `use_ghost_norms` choose how the sum is computed (memory, speed), not what:
        every path clips the same per-example norms to C (tests/privacy/test_clipping.py, test_ghost.py).
        """
        return clipping.clipped_grad(loss_fn, l2_clip=self.l2_clip, microbatch_size=microbatch_size,
                                     trainable=trainable, use_ghost_norms=use_ghost_norms)

    def noise(self, key: int | jax.Array, mask_key: jax.Array | None = None) -> optax.GradientTransformation:
        """The clipped sum -> (sum + N(0, (sigma C)^2)) / q N, with the noise of step t from fold_in(key, t) (XOR
        fold_in(mask_key, t)'s bits, `noise.noise_and_normalize`)."""
        return noise_and_normalize(l2_clip=self.l2_clip, noise_multiplier=self.params.noise_multiplier,
                                   expected_batch_size=self.selection.expected_batch_size, key=key, mask_key=mask_key)

    def optimizer(self, inner: optax.GradientTransformation, key: int | jax.Array,
                  mask_key: jax.Array | None = None) -> optax.GradientTransformation:
        """`optax.chain(self.noise(key, mask_key), inner)`: the DP optimizer over the clipped sum."""
        return optax.chain(self.noise(key, mask_key), inner)

    def ledger(self) -> PrivacyLedger:
        """A fresh ledger of this mechanism (no step recorded)."""
        return PrivacyLedger(self.params)

    def guard(self, ledger: PrivacyLedger) -> BudgetGuard | None:
        """The budget guard of `ledger` at this mechanism's target epsilon; None without a target."""
        return None if self.params.target_epsilon is None else BudgetGuard(ledger)
