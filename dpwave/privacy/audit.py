"""Empirical privacy audit in one training run (Steinke, Nasr & Jagielski, 2023).

"Privacy Auditing with One (1) Training Run", arXiv 2305.08846. Procedure:

1. Draw m canaries; include each in the training set independently with
   probability 1/2 (S_i in {in, out}); train ONCE.
2. Score every canary from the trained output (higher = looks included).
3. Guess "in" for the k_+ highest scores, "out" for the k_- lowest, abstain on the
   rest: r = k_+ + k_- guesses, v of them correct.
4. If training is (eps, delta)-DP, then (their Theorem 5.2 / Appendix D)

       P[V >= v] <= P[Bin(r, p) >= v] + 2 m delta * max_{1<=i<=v} P[v-i <= Bin(r, p) < v] / i

   with p = e^eps / (1 + e^eps), the accuracy of eps-randomized response. Every eps
   whose p-value is below beta is rejected, so the returned lower bound is the
   supremum of the rejected eps: with probability >= 1 - beta it does not exceed
   the true epsilon. delta=0 gives the pure-eps bound (the first term only).

k_+ and k_- must be fixed before looking at the scores; trying several pairs and
keeping the best needs a union bound (divide beta by the number of pairs).
"""

from __future__ import annotations

import dataclasses
import numbers

import numpy as np
from scipy import special, stats


@dataclasses.dataclass(frozen=True)
class AuditResult:
    """Outcome of a one-run audit: with confidence ``1 - beta``, epsilon >= the bound."""

    epsilon_lower_bound: float
    num_canaries: int
    num_guesses: int
    num_correct: int
    delta: float
    beta: float


def _check_counts(num_canaries: int, num_guesses: int, num_correct: int) -> None:
    if not 0 <= num_correct <= num_guesses <= num_canaries:
        raise ValueError(
            f"need 0 <= num_correct ({num_correct}) <= num_guesses ({num_guesses}) "
            f"<= num_canaries ({num_canaries}).")


def _check_delta_beta(delta: float, beta: float) -> None:
    if not 0 <= delta < 1:
        raise ValueError(f"delta={delta!r} must be in [0, 1).")
    if not 0 < beta < 1:
        raise ValueError(f"beta={beta!r} must be in (0, 1): 1 - beta is the confidence.")


def p_value(num_canaries: int, num_guesses: int, num_correct: int, epsilon: float,
            delta: float = 0.0) -> float:
    """Upper bound on P[>= num_correct correct guesses] under (epsilon, delta)-DP."""
    _check_counts(num_canaries, num_guesses, num_correct)
    if not epsilon >= 0:
        raise ValueError(f"epsilon={epsilon!r} must be >= 0.")
    r, v = num_guesses, num_correct
    p = special.expit(epsilon)
    tail = float(stats.binom.sf(v - 1, r, p))  # P[Bin(r, p) >= v]
    if delta == 0 or v == 0:
        return tail
    i = np.arange(1, v + 1)
    window = stats.binom.sf(v - i - 1, r, p) - tail  # P[v - i <= Bin(r, p) < v]
    return min(1.0, tail + 2 * num_canaries * delta * float(np.max(window / i)))


def epsilon_lower_bound(num_canaries: int, num_guesses: int, num_correct: int, *,
                        delta: float = 0.0, beta: float = 0.05) -> float:
    """Largest epsilon rejected at level beta (0.0 if even epsilon = 0 is not)."""
    _check_counts(num_canaries, num_guesses, num_correct)
    _check_delta_beta(delta, beta)

    def rejected(eps: float) -> bool:
        return p_value(num_canaries, num_guesses, num_correct, eps, delta) < beta

    if not rejected(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejected(hi):  # terminates: the p-value tends to >= P[Bin(r, 1) >= v] = 1
        lo, hi = hi, 2 * hi
    while hi - lo > 1e-9 * max(1.0, hi):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rejected(mid) else (lo, mid)
    return lo


def one_run_audit(scores: np.ndarray, included: np.ndarray, *, num_pos: int, num_neg: int,
                  delta: float = 0.0, beta: float = 0.05) -> AuditResult:
    """Guesses in/out from canary scores and converts the hits into an epsilon bound.

    ``scores[i]`` is high when canary i looks included; ``included[i]`` is the coin
    flip that decided it. The top ``num_pos`` scores are guessed in, the bottom
    ``num_neg`` out (ties broken by canary index, which is independent of the coins).
    """
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included)
    if scores.ndim != 1 or included.shape != scores.shape:
        raise ValueError(f"scores {scores.shape} and included {included.shape} must be "
                         "1-D arrays of the same length (one entry per canary).")
    if included.dtype != bool:
        raise ValueError(f"included must be a bool array, got dtype {included.dtype}.")
    if not np.all(np.isfinite(scores)):
        raise ValueError("scores contain NaN/inf; score every canary with a finite value.")
    m = scores.size
    if not (isinstance(num_pos, numbers.Integral) and isinstance(num_neg, numbers.Integral)
            and num_pos >= 0 and num_neg >= 0 and 0 < num_pos + num_neg <= m):
        raise ValueError(f"num_pos={num_pos!r} and num_neg={num_neg!r} must be integers >= 0 "
                         f"with 0 < num_pos + num_neg <= {m} canaries.")
    order = np.argsort(-scores, kind="stable")
    guessed_in, guessed_out = order[:num_pos], order[m - num_neg:]
    correct = int(included[guessed_in].sum() + (~included[guessed_out]).sum())
    bound = epsilon_lower_bound(m, num_pos + num_neg, correct, delta=delta, beta=beta)
    return AuditResult(bound, m, num_pos + num_neg, correct, delta, beta)
