"""Privacy accounting for DP-SGD with Poisson sampling, on dp_accounting 0.6.

One training step is the Poisson-subsampled Gaussian mechanism: every example of
the private set enters the step independently with probability ``q``, its gradient
is clipped to L2 norm C, and Gaussian noise of standard deviation ``sigma * C`` is
added once to the sum. ``T`` steps are the self-composition of that one event
(``SelfComposedDpEvent``), which keeps accounting cheap for any ``T``.

Neighbouring relations (``neighboring``):

* ``"add_or_remove_one"`` (default): the datasets differ by one example added or
  removed. q = B / N and N itself are published, so N must be treated as public.
* ``"replace_one"``: one example is swapped for another, N is the same on both
  sides. The sum of clipped gradients moves by up to 2C instead of C, so epsilon is
  larger for the same sigma. dp_accounting 0.6 supports it for both step events
  under PLD only (its RDP accountant refuses ``PoissonSampledDpEvent`` with it).

Accountants:

* ``"pld"`` (default): privacy loss distributions with
  ``value_discretization_interval=1e-3``. dp_accounting's own default (1e-4) is
  ~8x slower per evaluation (0.30 s vs 0.04 s for the MNIST setting below, 2 CPU
  cores): calibrate_noise takes 0.7-3.3 s of CPU instead of 0.2-0.4 s for 1e3-1e5
  steps, for an epsilon smaller by ~0.4% (2.382 vs 2.391). PLD is pessimistic:
  the discretization only ever rounds epsilon up (experiments/bench/
  bench_accounting.py measures all of this).
* ``"rdp"``: Renyi DP, faster and looser (MNIST, q=256/60000, sigma=1.1, 14,062
  steps, delta=1e-5: RDP 2.60, PLD 2.39).

Truncated Poisson sampling (the sampler caps a batch at ``max_batch_size`` B):

* PLD uses dp_accounting's ``TruncatedSubsampledGaussianDpEvent`` (arXiv
  2508.15089), whose analysis assumes an oversized Poisson batch is cut down to a
  uniformly random subset of B of its examples.
* RDP has no analysis of that event, so it uses a coupling bound valid for any
  truncation rule: the truncated and the untruncated run coincide unless some step
  truncates, so their outputs are within total variation
  ``tau = sum_steps P(Binomial(N + 1, q) > B)`` on both neighbouring datasets
  (N + 1 bounds the larger one). If the untruncated run is (eps, delta_u)-DP the
  truncated one is (eps, delta_u + (1 + e^eps) tau)-DP; epsilon is reported at
  the delta_u that makes this equal to the requested delta.

A run's composed events live in ``ledger.py``; its privacy statement in ``statement.py``.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Callable

import dp_accounting
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import stats


ACCOUNTANTS = ("pld", "rdp")
DEFAULT_PLD_DISCRETIZATION = 1e-3
NEIGHBORING_RELATIONS = {"add_or_remove_one": dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
                         "replace_one": dp_accounting.NeighboringRelation.REPLACE_ONE}
DEFAULT_NEIGHBORING = "add_or_remove_one"

# Search range of calibrate_noise: below _SIGMA_MIN the PLD evaluation gets slow
# (seconds) and epsilon is in the hundreds; above _SIGMA_MAX nothing is learned.
_SIGMA_MIN = 1e-2
_SIGMA_MAX = 1e6
# Relative slack added to the truncated-RDP fixed point so it can be verified.
_FIXED_POINT_SLACK = 1e-6


class LargeDeltaWarning(UserWarning):
    """delta >= 1/N: a mechanism that leaks one whole example can meet such a delta."""


# --------------------------------------------------------------------------- checks


def _is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_noise_multiplier(noise_multiplier: float) -> None:
    if not (_is_real(noise_multiplier) and noise_multiplier >= 0
            and math.isfinite(noise_multiplier)):
        raise ValueError(
            f"noise_multiplier={noise_multiplier!r} must be a finite number >= 0 "
            "(the Gaussian noise std divided by the clipping norm; 0 = no privacy).")


def check_sampling_prob(sampling_prob: float) -> None:
    if not (_is_real(sampling_prob) and 0 < sampling_prob <= 1):
        raise ValueError(
            f"sampling_prob={sampling_prob!r} must be in (0, 1]: the Poisson inclusion "
            "probability q = expected_batch_size / dataset_size.")


def check_steps(steps: int) -> None:
    if not (_is_int(steps) and steps >= 0):
        raise ValueError(f"steps={steps!r} must be an integer >= 0.")


def check_target_epsilon(target_epsilon: float) -> None:
    if not (_is_real(target_epsilon) and 0 < target_epsilon < math.inf):
        raise ValueError(f"target_epsilon={target_epsilon!r} must be a finite number > 0.")


def check_accountant(accountant: str, pld_discretization: float) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant={accountant!r} is unknown; use one of {ACCOUNTANTS}.")
    if not (_is_real(pld_discretization) and 0 < pld_discretization < 1):
        raise ValueError(
            f"pld_discretization={pld_discretization!r} must be in (0, 1) "
            f"(default {DEFAULT_PLD_DISCRETIZATION}).")


def check_neighboring(neighboring: str, accountant: str) -> None:
    if neighboring not in NEIGHBORING_RELATIONS:
        raise ValueError(f"neighboring={neighboring!r} is unknown; use one of {tuple(NEIGHBORING_RELATIONS)}.")
    if neighboring == "replace_one" and accountant != "pld":
        raise ValueError("neighboring='replace_one' needs accountant='pld': dp_accounting's RDP accountant "
                         "supports only add-or-remove-one for Poisson-sampled Gaussian steps.")


def check_truncation(dataset_size: int | None, max_batch_size: int | None) -> None:
    if dataset_size is not None and not (_is_int(dataset_size) and dataset_size >= 1):
        raise ValueError(f"dataset_size={dataset_size!r} must be an integer >= 1.")
    if max_batch_size is None:
        return
    if not (_is_int(max_batch_size) and max_batch_size >= 1):
        raise ValueError(f"max_batch_size={max_batch_size!r} must be an integer >= 1 or None.")
    if dataset_size is None:
        raise ValueError(
            f"max_batch_size={max_batch_size} (truncated Poisson sampling) needs "
            "dataset_size: the truncation probability depends on it.")


def check_delta(delta: float, dataset_size: int | None = None,
                allow_large_delta: bool = False) -> None:
    """delta must be in (0, 1); above 1/N it is refused unless explicitly allowed."""
    if not (_is_real(delta) and 0 < delta < 1):
        raise ValueError(f"delta={delta!r} must be in (0, 1), typically << 1/dataset_size.")
    if dataset_size is None or delta < 1 / dataset_size:
        return
    message = (
        f"delta={delta:g} >= 1/N = {1 / dataset_size:g} (N={dataset_size}): a "
        "mechanism that publishes one random example in full meets this delta. "
        f"Use delta well below 1/N (e.g. {10 ** math.floor(math.log10(0.1 / dataset_size)):g}).")
    if delta > 1 / dataset_size and not allow_large_delta:
        raise ValueError(message + " Pass allow_large_delta=True to accept it anyway.")
    warnings.warn("WEAK PRIVACY GUARANTEE: " + message, LargeDeltaWarning, stacklevel=3)


# --------------------------------------------------------------------------- events


def truncation_probability(dataset_size: int, sampling_prob: float,
                           max_batch_size: int) -> float:
    """P(Binomial(N + 1, q) > B): chance that one step truncates, on either neighbour."""
    return float(stats.binom.sf(max_batch_size, dataset_size + 1, sampling_prob))


def step_event(noise_multiplier: float, sampling_prob: float, *,
               dataset_size: int | None = None,
               max_batch_size: int | None = None) -> dp_event.DpEvent:
    """The DpEvent of one DP-SGD step (truncated Poisson when max_batch_size < N)."""
    check_noise_multiplier(noise_multiplier)
    check_sampling_prob(sampling_prob)
    check_truncation(dataset_size, max_batch_size)
    if max_batch_size is None or max_batch_size >= dataset_size:
        return dp_event.PoissonSampledDpEvent(
            float(sampling_prob), dp_event.GaussianDpEvent(float(noise_multiplier)))
    return dp_event.TruncatedSubsampledGaussianDpEvent(
        dataset_size=int(dataset_size), sampling_probability=float(sampling_prob),
        truncated_batch_size=int(max_batch_size), noise_multiplier=float(noise_multiplier))


def _untruncate(event: dp_event.DpEvent, count: int = 1) -> tuple[dp_event.DpEvent, float]:
    """Replaces truncated events by plain Poisson ones; returns the total truncation TV."""
    if isinstance(event, dp_event.TruncatedSubsampledGaussianDpEvent):
        plain = dp_event.PoissonSampledDpEvent(
            event.sampling_probability, dp_event.GaussianDpEvent(event.noise_multiplier))
        tau = truncation_probability(
            event.dataset_size, event.sampling_probability, event.truncated_batch_size)
        return plain, count * tau
    if isinstance(event, dp_event.SelfComposedDpEvent):
        inner, tau = _untruncate(event.event, count * event.count)
        return dp_event.SelfComposedDpEvent(inner, event.count), tau
    if isinstance(event, dp_event.ComposedDpEvent):
        parts = [_untruncate(e, count) for e in event.events]
        return dp_event.ComposedDpEvent([p for p, _ in parts]), sum(t for _, t in parts)
    return event, 0.0


def _has_steps(event: dp_event.DpEvent) -> bool:
    """False for events that compose to nothing (dp_accounting refuses count=0)."""
    if isinstance(event, dp_event.SelfComposedDpEvent):
        return event.count > 0 and _has_steps(event.event)
    if isinstance(event, dp_event.ComposedDpEvent):
        return any(_has_steps(e) for e in event.events)
    return not isinstance(event, dp_event.NoOpDpEvent)


def _prune(event: dp_event.DpEvent) -> dp_event.DpEvent:
    if isinstance(event, dp_event.ComposedDpEvent):
        return dp_event.ComposedDpEvent([_prune(e) for e in event.events if _has_steps(e)])
    return event


def epsilon_of_event(event: dp_event.DpEvent, delta: float, accountant: str = "pld", *,
                     pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
                     neighboring: str = DEFAULT_NEIGHBORING) -> float:
    """Epsilon at ``delta`` of any (composed) DpEvent under the named accountant and neighbouring relation."""
    check_delta(delta)
    check_accountant(accountant, pld_discretization)
    check_neighboring(neighboring, accountant)
    relation = NEIGHBORING_RELATIONS[neighboring]
    if not _has_steps(event):
        return 0.0
    event = _prune(event)
    if accountant == "pld":
        acc = pld_privacy_accountant.PLDAccountant(
            relation, value_discretization_interval=pld_discretization)
        acc.compose(event)
        return float(acc.get_epsilon(delta))
    plain, tau = _untruncate(event)
    acc = rdp_privacy_accountant.RdpAccountant(neighboring_relation=relation)
    acc.compose(plain)
    if tau == 0.0:
        return float(acc.get_epsilon(delta))
    return _truncated_fixed_point(acc.get_epsilon, delta, tau)


def _truncated_fixed_point(eps_at: Callable[[float], float], delta: float,
                           tau: float) -> float:
    """Smallest verified eps with eps_at(delta - (1 + e^eps) tau) <= eps."""
    eps = 0.0
    for _ in range(100):
        delta_u = delta - (1 + math.exp(min(eps, 700.0))) * tau
        if delta_u <= 0:
            raise ValueError(
                f"truncation probability mass {tau:.3g} (summed over steps) leaves no room "
                f"in delta={delta:g}; raise max_batch_size or use accountant='pld'.")
        candidate = eps_at(delta_u)
        if candidate <= eps:
            return float(eps)
        eps = candidate * (1 + _FIXED_POINT_SLACK)
    raise RuntimeError(f"truncated-Poisson RDP bound did not converge (tau={tau:g}).")


def epsilon(noise_multiplier: float, sampling_prob: float, steps: int, delta: float,
            accountant: str = "pld", *, dataset_size: int | None = None,
            max_batch_size: int | None = None,
            pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
            allow_large_delta: bool = False, neighboring: str = DEFAULT_NEIGHBORING) -> float:
    """Epsilon of ``steps`` DP-SGD steps at ``delta`` (inf when noise_multiplier == 0)."""
    check_steps(steps)
    check_delta(delta, dataset_size, allow_large_delta)
    event = dp_event.SelfComposedDpEvent(
        step_event(noise_multiplier, sampling_prob, dataset_size=dataset_size,
                   max_batch_size=max_batch_size), steps)
    return epsilon_of_event(event, delta, accountant, pld_discretization=pld_discretization,
                            neighboring=neighboring)


# --------------------------------------------------------------------------- calibration


def calibrate_noise(target_epsilon: float, delta: float, sampling_prob: float, steps: int,
                    accountant: str = "pld", *, dataset_size: int | None = None,
                    max_batch_size: int | None = None,
                    pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
                    allow_large_delta: bool = False, rtol: float = 0.01,
                    neighboring: str = DEFAULT_NEIGHBORING) -> float:
    """A noise multiplier whose epsilon lies in [(1 - rtol) * target, target].

    A safeguarded secant search on (log sigma, log epsilon) from sigma = 1: each step
    fits a line through the last two evaluations, moves at most 2x down / 4x up in
    sigma, and falls back to bisection whenever the step would leave the bracket
    [sigma with epsilon > target, sigma with epsilon <= target] or two rounds fail to
    halve it. Only a sigma whose epsilon was computed and found <= target is returned.
    """
    check_target_epsilon(target_epsilon)
    check_steps(steps)
    check_delta(delta, dataset_size, allow_large_delta)
    check_sampling_prob(sampling_prob)
    check_truncation(dataset_size, max_batch_size)
    check_accountant(accountant, pld_discretization)
    check_neighboring(neighboring, accountant)
    if not 0 < rtol < 1:
        raise ValueError(f"rtol={rtol!r} must be in (0, 1).")
    if steps == 0:
        raise ValueError("steps=0 spends no privacy: there is no noise to calibrate.")

    def log_eps(log_sigma: float) -> float:
        e = epsilon(math.exp(log_sigma), sampling_prob, steps, delta, accountant,
                    dataset_size=dataset_size, max_batch_size=max_batch_size,
                    pld_discretization=pld_discretization, allow_large_delta=True, neighboring=neighboring)
        return math.log(e) if e > 0 else -math.inf

    top, floor = math.log(target_epsilon), math.log((1 - rtol) * target_epsilon)
    aim = math.log((1 - rtol / 2) * target_epsilon)
    lo, hi = -math.inf, math.inf  # log sigma: epsilon(lo) > target >= epsilon(hi)
    hi_eps = math.nan
    prev, x = None, 0.0
    widths, stalls = [math.inf], 0  # bisect after two rounds that fail to halve the bracket
    for _ in range(200):
        y = log_eps(x)
        if y > top:
            lo = max(lo, x)
        else:
            if x < hi:
                hi, hi_eps = x, y
            if y >= floor:
                return math.exp(x)
        if x >= math.log(_SIGMA_MAX) and y > top:
            raise ValueError(
                f"target_epsilon={target_epsilon} is unreachable: epsilon={math.exp(y):.4g} "
                f"even at noise_multiplier={math.exp(x):g}. With accountant='pld' the "
                "discretization puts a floor under epsilon; lower pld_discretization or "
                "use accountant='rdp'.")
        if x <= math.log(_SIGMA_MIN) and y <= top:
            raise ValueError(
                f"target_epsilon={target_epsilon} is too large: epsilon="
                f"{math.exp(y):.4g} <= target even at noise_multiplier={math.exp(x):g}. "
                "Lower the target or the number of steps.")
        width = hi - lo
        if width < 1e-12:
            break
        # Moving down in sigma is where epsilon is steep and evaluations are slow:
        # guess slope -3 there (and -1 upwards, exact for large sigma) and step
        # at most 2x down, 4x up.
        slope = -1.0 if y > aim else -3.0
        if prev is not None and math.isfinite(prev[1]) and math.isfinite(y) and prev[1] != y:
            slope = min((y - prev[1]) / (x - prev[0]), -1e-3)
        step = (aim - y) / slope if math.isfinite(y) else (math.log(4) if y > 0 else -1.0)
        nxt = x + max(-math.log(2), min(math.log(4), step))
        nxt = max(math.log(_SIGMA_MIN), min(math.log(_SIGMA_MAX), nxt))
        stalls = stalls + 1 if width > widths[-1] / 2 else 0
        widths.append(width)
        if math.isfinite(width) and (stalls >= 2 or not lo < nxt < hi):
            nxt, stalls = (lo + hi) / 2, 0
        prev, x = (x, y), nxt
    if not math.isfinite(hi):
        raise RuntimeError(f"calibrate_noise found no sigma with epsilon <= {target_epsilon}.")
    warnings.warn(f"calibrate_noise: epsilon jumps across the target; returning sigma="
                  f"{math.exp(hi):.6g} with epsilon={math.exp(hi_eps):.6g} below "
                  f"{(1 - rtol) * target_epsilon:.6g}.", stacklevel=2)
    return math.exp(hi)
