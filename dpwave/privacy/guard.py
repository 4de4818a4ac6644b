"""Budget guard: a training loop never takes a step that would exceed its epsilon.

Epsilon grows monotonically with the number of steps of a fixed mechanism, so the
guard computes once (a growth phase, then interpolation search in the bracket:
O(log T) accountant calls, ~8 in practice) the largest number of further steps the
budget allows, and each ``can_step`` is an integer comparison. The budget is recomputed only
when the ledger's mechanism or parameters change (``PrivacyLedger.revision``).

    guard = BudgetGuard(ledger)            # target from ledger.params.target_epsilon
    for step in ...:
        if not guard.can_step(1):          # the DP stage stops cleanly here (loop.StopStage)
            break
        ...train one step...
        ledger.record_steps(1)
"""

from __future__ import annotations

import math
import numbers

from dpwave.privacy.accounting import check_target_epsilon
from dpwave.privacy.ledger import PrivacyLedger

# Beyond this many further steps the budget is treated as unlimited (epsilon of a
# Gaussian mechanism with sigma > 0 grows without bound, but slowly).
_MAX_STEPS = 2**40


class BudgetGuard:
    """Refuses steps whose composed epsilon would exceed ``target_epsilon``."""

    def __init__(self, ledger: PrivacyLedger, target_epsilon: float | None = None) -> None:
        self._ledger = ledger
        self._explicit_target = target_epsilon
        self._budget: tuple[int, int] | None = None  # (revision, max total steps)
        check_target_epsilon(self.target_epsilon)

    @property
    def target_epsilon(self) -> float:
        """The explicit target if one was given, else the ledger's current one."""
        target = self._explicit_target
        if target is None:
            target = self._ledger.params.target_epsilon
        if target is None:
            raise ValueError("BudgetGuard needs a target epsilon: pass target_epsilon or set "
                             "it in the ledger's DP params (target_epsilon=...).")
        return target

    def _max_total_steps(self) -> int:
        ledger = self._ledger
        if self._budget is None or self._budget[0] != ledger.revision:
            self._budget = (ledger.revision, ledger.steps + self._max_more_steps())
        return self._budget[1]

    def _max_more_steps(self) -> int:
        """Largest n with epsilon_after(n) <= target (0 if even one step is too many).

        Grow n (at least 2x, at most 64x per probe) to the larger of two guesses --
        epsilon ~ sqrt(n) (a fresh run) and the linear extrapolation of the last two
        probes (a run dominated by earlier events) -- until epsilon exceeds the target.
        Then interpolate in (log n, log epsilon) inside the bracket, pairing each probe
        m with its neighbour (m + 1 if m fits, m - 1 if not) so the integer bracket
        closes as soon as the interpolation is accurate, and bisect whenever a round
        fails to halve the bracket.
        """
        target = self.target_epsilon
        eps = self._ledger.epsilon_after
        good, e_good = 1, eps(1)
        if e_good > target:
            return 0
        prev = (0, self._ledger.epsilon())
        while True:
            guess = good * (target / e_good) ** 2 if e_good > 0 else 2.0 * good
            if e_good > prev[1]:
                slope = (e_good - prev[1]) / (good - prev[0])
                guess = max(guess, good + (target - e_good) / slope)
            n = int(min(max(guess, 2 * good), 64 * good))
            if n >= _MAX_STEPS:
                return _MAX_STEPS
            e = eps(n)
            if e > target:
                bad, e_bad = n, e
                break
            prev, good, e_good = (good, e_good), n, e
        while bad - good > 1:
            width = bad - good
            frac = math.log(target / e_good) / math.log(e_bad / e_good) if e_good > 0 else 0.5
            m = math.exp(math.log(good) + frac * math.log(bad / good))
            m = min(max(int(m), good + 1), bad - 1)
            good, e_good, bad, e_bad = self._probe(m, good, e_good, bad, e_bad)
            neighbour = m + 1 if good == m else m - 1
            if good < neighbour < bad:
                good, e_good, bad, e_bad = self._probe(neighbour, good, e_good, bad, e_bad)
            if bad - good > width // 2 and bad - good > 1:
                good, e_good, bad, e_bad = self._probe(
                    (good + bad) // 2, good, e_good, bad, e_bad)
        return good

    def _probe(self, m: int, good: int, e_good: float, bad: int,
               e_bad: float) -> tuple[int, float, int, float]:
        """Evaluates m and returns the narrowed bracket (good, e_good, bad, e_bad)."""
        e = self._ledger.epsilon_after(m)
        return (m, e, bad, e_bad) if e <= self.target_epsilon else (good, e_good, m, e)

    @property
    def remaining_steps(self) -> int:
        """Further steps of the current mechanism the budget allows."""
        return max(0, self._max_total_steps() - self._ledger.steps)

    def can_step(self, n: int = 1) -> bool:
        """Whether n more steps keep epsilon <= target (an integer comparison)."""
        if not (isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 1):
            raise ValueError(f"n={n!r} must be an integer >= 1.")
        return n <= self.remaining_steps
