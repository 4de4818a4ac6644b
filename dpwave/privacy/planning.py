"""Plans a DP finetuning run: (expected batch B, steps S, sigma) for a target (epsilon, delta), N and a budget.

    python -m dpwave.privacy.planning --epsilon 10 --delta 1e-5 --n 2000 --budget 76800

The compute budget is the number of examples processed, B * S (a DP step's cost is linear in its batch).
For each candidate B the planner takes S = budget // B, calibrates sigma with `calibrate_noise` (the
function the DP stage calls, so a proposal runs with exactly this sigma, its epsilon within 1% below the
target; dp_accounting's generic `calibrate_dp_mechanism` would bisect to the same point without that
guarantee or the PLD-aware search), and ranks the candidates, best first, by one of:

* ``noise_to_signal`` (default): sigma / (B sqrt(S)). After S steps of averaged clipped gradients the
  summed noise has norm about sigma C sqrt(S d) / B against a summed signal of norm at most S C, so
  their ratio is sqrt(d) times this. It is the "total amount of noise" sigma / (q sqrt(S)) of Sander et
  al. 2023 ("TAN Without a Burn: Scaling Laws of DP-SGD") divided by N. Where sigma is large it is
  nearly constant across B at fixed epsilon (epsilon is then a function of it), so it mainly ranks down
  batches small enough to need sigma < ~1, where epsilon grows faster as sigma falls (De et al. 2022,
  "Unlocking High-Accuracy Differentially Private Image Classification through Scale": large batches).
* ``effective_noise``: sigma / B, the per-step noise std of the averaged gradient in units of C. At a
  fixed number of steps, training outcomes follow it (Sander et al. 2023); at a fixed budget it favours
  few large steps.

Ties (within 1%) go to more steps (more optimizer updates). The table shows both numbers; pick from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Sequence

from dpwave.privacy.accounting import ACCOUNTANTS, calibrate_noise, epsilon

CRITERIA = ("noise_to_signal", "effective_noise")
_TIE = 0.01  # relative difference under which two candidates tie and the one with more steps wins


@dataclasses.dataclass(frozen=True)
class Plan:
    """One candidate schedule and the epsilon the accountant gives it."""

    expected_batch_size: int
    steps: int
    noise_multiplier: float
    epsilon: float
    sampling_prob: float

    @property
    def effective_noise(self) -> float:
        """sigma / B: the noise std of one averaged step, in units of the clipping norm."""
        return self.noise_multiplier / self.expected_batch_size

    @property
    def noise_to_signal(self) -> float:
        """sigma / (B sqrt(S)): summed noise over summed signal, per sqrt(parameter)."""
        return self.effective_noise / math.sqrt(self.steps)

    def overrides(self) -> str:
        """The DP stage's config overrides that run this plan (sigma is calibrated to the same value)."""
        return (f"--config.dp.mechanism.expected_batch_size={self.expected_batch_size} "
                f"--config.dp.mechanism.steps={self.steps}")


def run_noise_multiplier(target_epsilon: float, delta: float, sampling_prob: float, steps: int, *,
                         accountant: str, neighboring: str, given: float | None = None) -> float:
    """A run's sigma: `given` as is; 0 for the non-private reference (target epsilon inf: still clipped); else the
    smallest sigma `calibrate_noise` finds whose epsilon over `steps` steps of rate `sampling_prob` is <= target."""
    if given is not None:
        return float(given)
    if math.isinf(target_epsilon):
        return 0.0
    return calibrate_noise(target_epsilon, delta, sampling_prob, steps, accountant=accountant,
                           neighboring=neighboring)


def tuning_noise_scale(stand_in_size: int, private_size: int) -> float:
    """The factor on a private run's sigma when a public stand-in of `stand_in_size` examples is trained at that
    run's q (docs/tuning.md): its expected batch is q n instead of q N, and sigma n / N keeps the noise per step
    sigma / B of the private run (Sander et al. 2023 simulate runs the same way)."""
    return stand_in_size / private_size


def default_batch_sizes(n: int, budget: int) -> list[int]:
    """Powers of two from 16 up to min(N, budget)."""
    top = min(n, budget)
    return [2**k for k in range(4, int(math.log2(top)) + 1)] if top >= 16 else [top]


def plan(target_epsilon: float, delta: float, n: int, budget: int, *, batch_sizes: Sequence[int] | None = None,
         criterion: str = "noise_to_signal", accountant: str = "pld") -> list[Plan]:
    """Every candidate expected batch size that reaches the target, ranked best first by `criterion`.

    A batch whose S = budget // B steps cannot be calibrated (epsilon stays under the target even at the
    smallest noise calibrate_noise allows) is left out.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion={criterion!r}; use one of {CRITERIA}")
    if not (isinstance(n, int) and n >= 1 and isinstance(budget, int) and budget >= 1):
        raise ValueError(f"n={n!r} and budget={budget!r} must be positive integers")
    sizes = sorted(set(batch_sizes or default_batch_sizes(n, budget)))
    bad = [b for b in sizes if not 1 <= b <= min(n, budget)]
    if bad:
        raise ValueError(f"expected batch sizes {bad} must lie in [1, min(N, budget)] = [1, {min(n, budget)}]")
    plans = []
    for batch in sizes:
        steps, q = budget // batch, batch / n
        try:
            sigma = calibrate_noise(target_epsilon, delta, q, steps, accountant=accountant, dataset_size=n)
        except ValueError:  # the target is too large for these steps: any tiny noise meets it
            continue
        eps = epsilon(sigma, q, steps, delta, accountant, dataset_size=n)
        plans.append(Plan(batch, steps, sigma, eps, q))
    if not plans:
        raise ValueError(f"no candidate batch size reaches epsilon {target_epsilon}: raise the budget or lower "
                         "the target")
    best = min(getattr(p, criterion) for p in plans)

    def rank(p: Plan) -> tuple[int, float]:  # within _TIE of the best: more steps first; then by the criterion
        value = getattr(p, criterion)
        return (0, -p.steps) if value <= best * (1 + _TIE) else (1, value)

    return sorted(plans, key=rank)


def table(plans: Sequence[Plan], criterion: str) -> str:
    """The ranked plans as a markdown table."""
    lines = ["| rank | expected batch | q | steps | sigma | epsilon | sigma/B | sigma/(B sqrt(S)) |",
             "|---|---|---|---|---|---|---|---|"]
    for i, p in enumerate(plans, 1):
        lines.append(f"| {i} | {p.expected_batch_size} | {p.sampling_prob:.4g} | {p.steps} | {p.noise_multiplier:.4g} "
                     f"| {p.epsilon:.4g} | {p.effective_noise:.3g} | {p.noise_to_signal:.3g} |")
    lines += ["", f"ranked by {criterion} (lower first; within {_TIE:.0%} of the best, more steps first); "
              f"best: {plans[0].overrides()}"]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epsilon", type=float, required=True, help="target epsilon")
    parser.add_argument("--delta", type=float, required=True)
    parser.add_argument("--n", type=int, required=True, help="private dataset size N")
    parser.add_argument("--budget", type=int, required=True, help="examples processed: expected batch x steps")
    parser.add_argument("--batch-sizes", help="comma-separated expected batch sizes (default: powers of 2 from 16)")
    parser.add_argument("--criterion", choices=CRITERIA, default="noise_to_signal")
    parser.add_argument("--accountant", choices=ACCOUNTANTS, default="pld")
    args = parser.parse_args(argv)
    sizes = [int(b) for b in args.batch_sizes.split(",") if b] if args.batch_sizes else None
    try:
        plans = plan(args.epsilon, args.delta, args.n, args.budget, batch_sizes=sizes, criterion=args.criterion,
                     accountant=args.accountant)
    except ValueError as e:
        parser.error(str(e))
    print(f"target (epsilon {args.epsilon:g}, delta {args.delta:g}), N = {args.n}, budget {args.budget} examples, "
          f"{args.accountant} accountant")
    print(table(plans, args.criterion))
    return 0


if __name__ == "__main__":
    sys.exit(main())
