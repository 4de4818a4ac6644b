"""Privacy accounting for DP-SGD with Poisson sampling, on dp_accounting 0.6.

One training step is the Poisson-subsampled Gaussian mechanism: every example of
the private set enters the step independently with probability ``q``, its gradient
is clipped to L2 norm C, and Gaussian noise of standard deviation ``sigma * C`` is
added once to the sum. ``T`` steps are the self-composition of that one event
(``SelfComposedDpEvent``), which keeps accounting cheap for any ``T``.

Accountants (neighbouring relation: add or remove one example):

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
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from typing import Callable

import dp_accounting
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import stats

ACCOUNTANTS = ("pld", "rdp")
DEFAULT_PLD_DISCRETIZATION = 1e-3
NEIGHBORING_RELATION = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE

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
                     pld_discretization: float = DEFAULT_PLD_DISCRETIZATION) -> float:
    """Epsilon at ``delta`` of any (composed) DpEvent under the named accountant."""
    check_delta(delta)
    check_accountant(accountant, pld_discretization)
    if not _has_steps(event):
        return 0.0
    event = _prune(event)
    if accountant == "pld":
        acc = pld_privacy_accountant.PLDAccountant(
            NEIGHBORING_RELATION, value_discretization_interval=pld_discretization)
        acc.compose(event)
        return float(acc.get_epsilon(delta))
    plain, tau = _untruncate(event)
    acc = rdp_privacy_accountant.RdpAccountant(neighboring_relation=NEIGHBORING_RELATION)
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
            allow_large_delta: bool = False) -> float:
    """Epsilon of ``steps`` DP-SGD steps at ``delta`` (inf when noise_multiplier == 0)."""
    check_steps(steps)
    check_delta(delta, dataset_size, allow_large_delta)
    event = dp_event.SelfComposedDpEvent(
        step_event(noise_multiplier, sampling_prob, dataset_size=dataset_size,
                   max_batch_size=max_batch_size), steps)
    return epsilon_of_event(event, delta, accountant, pld_discretization=pld_discretization)


# --------------------------------------------------------------------------- calibration


def calibrate_noise(target_epsilon: float, delta: float, sampling_prob: float, steps: int,
                    accountant: str = "pld", *, dataset_size: int | None = None,
                    max_batch_size: int | None = None,
                    pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
                    allow_large_delta: bool = False, rtol: float = 0.01) -> float:
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
    if not 0 < rtol < 1:
        raise ValueError(f"rtol={rtol!r} must be in (0, 1).")
    if steps == 0:
        raise ValueError("steps=0 spends no privacy: there is no noise to calibrate.")

    def log_eps(log_sigma: float) -> float:
        e = epsilon(math.exp(log_sigma), sampling_prob, steps, delta, accountant,
                    dataset_size=dataset_size, max_batch_size=max_batch_size,
                    pld_discretization=pld_discretization, allow_large_delta=True)
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


# --------------------------------------------------------------------------- ledger


class LedgerMismatchError(ValueError):
    """Resuming with DP hyperparameters that differ from the ledger's."""


_MISSING = object()
# Fields whose change alters the guarantee; a resume must keep them or compose.
_GUARANTEE_FIELDS = ("noise_multiplier", "sampling_prob", "delta", "accountant",
                     "target_epsilon", "dataset_size", "max_batch_size", "pld_discretization")


def _read(config_like: object, name: str) -> object:
    if isinstance(config_like, Mapping):
        return config_like.get(name, _MISSING)
    return getattr(config_like, name, _MISSING)


@dataclasses.dataclass(frozen=True)
class DpParams:
    """The DP hyperparameters a run is accounted under (all public constants).

    ``max_batch_size`` is the sampler's truncation cap B (None: never truncates).
    ``target_epsilon`` is the budget a BudgetGuard enforces.
    """

    noise_multiplier: float
    sampling_prob: float
    delta: float
    accountant: str = "pld"
    target_epsilon: float | None = None
    dataset_size: int | None = None
    max_batch_size: int | None = None
    pld_discretization: float = DEFAULT_PLD_DISCRETIZATION
    allow_large_delta: bool = False

    def __post_init__(self) -> None:
        check_noise_multiplier(self.noise_multiplier)
        check_sampling_prob(self.sampling_prob)
        check_accountant(self.accountant, self.pld_discretization)
        check_truncation(self.dataset_size, self.max_batch_size)
        check_delta(self.delta, self.dataset_size, self.allow_large_delta)
        if self.target_epsilon is not None:
            check_target_epsilon(self.target_epsilon)
        # Plain Python scalars, so the params are JSON-ready and compare exactly.
        for name in ("noise_multiplier", "sampling_prob", "delta", "target_epsilon",
                     "pld_discretization"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, float(getattr(self, name)))
        for name in ("dataset_size", "max_batch_size"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, int(getattr(self, name)))

    @classmethod
    def from_config(cls, config_like: object) -> DpParams:
        """Reads the fields above from a mapping or attribute object (e.g. ConfigDict).

        ``sampling_prob`` may instead be given as ``expected_batch_size`` together with
        ``dataset_size``. Unrelated fields are ignored.
        """
        if isinstance(config_like, DpParams):
            return config_like
        values = {f.name: _read(config_like, f.name) for f in dataclasses.fields(cls)}
        batch = _read(config_like, "expected_batch_size")
        if values["sampling_prob"] is _MISSING and batch is not _MISSING:
            size = values["dataset_size"]
            if size is _MISSING or not size:
                raise ValueError("expected_batch_size given without dataset_size: cannot "
                                 "derive sampling_prob = expected_batch_size / dataset_size.")
            values["sampling_prob"] = batch / size
        missing = [n for n in ("noise_multiplier", "sampling_prob", "delta")
                   if values[n] is _MISSING]
        if missing:
            raise ValueError(f"DP config lacks {missing}; it needs noise_multiplier, delta "
                             "and sampling_prob (or expected_batch_size + dataset_size).")
        return cls(**{k: v for k, v in values.items() if v is not _MISSING})

    @property
    def expected_batch_size(self) -> float | None:
        return None if self.dataset_size is None else self.sampling_prob * self.dataset_size

    def step_event(self) -> dp_event.DpEvent:
        return step_event(self.noise_multiplier, self.sampling_prob,
                          dataset_size=self.dataset_size, max_batch_size=self.max_batch_size)

    def differences(self, other: DpParams) -> list[str]:
        """Human-readable list of guarantee-relevant fields that differ."""
        out = []
        for name in _GUARANTEE_FIELDS:
            a, b = getattr(self, name), getattr(other, name)
            same = (math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
                    if isinstance(a, float) and isinstance(b, float) else a == b)
            if not same:
                out.append(f"{name}: {a!r} (ledger) -> {b!r} (new config)")
        return out


def _event_to_json(event: dp_event.DpEvent) -> dict:
    def convert(value: object) -> object:
        if isinstance(value, dp_event.DpEventNamedTuple):
            return {name: convert(getattr(value, name)) for name in value._fields}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        return value
    return convert(event.to_named_tuple())


def _event_from_json(data: dict) -> dp_event.DpEvent:
    def convert(value: object) -> object:
        if isinstance(value, list):
            return [convert(v) for v in value]
        if not isinstance(value, dict):
            return value
        module, name = value.get("module_name"), value.get("class_name")
        cls = getattr(dp_event, str(name), None)
        if module != dp_event.__name__ or not (
                isinstance(cls, type) and issubclass(cls, dp_event.DpEvent)):
            raise ValueError(f"ledger JSON holds an unknown event {module}.{name}; only "
                             f"{dp_event.__name__} classes are accepted.")
        fields = {k: convert(v) for k, v in value.items()}
        return collections.namedtuple(f"_{name}Json", list(fields))(**fields)
    return dp_event.DpEvent.from_named_tuple(convert(data))


class PrivacyLedger:
    """The composed DpEvents of a DP run plus its DP hyperparameters.

    Events are stored compactly as ``SelfComposedDpEvent(step_event, count)``; steps
    recorded under an unchanged mechanism extend the last event. Epsilon is always
    recomputed from the events (never stored state), so a checkpointed ledger
    (``to_dict``/``to_json``) restores the exact guarantee.
    """

    FORMAT = "dpwave.privacy_ledger/1"

    def __init__(self, params: DpParams,
                 events: Sequence[dp_event.SelfComposedDpEvent] = ()) -> None:
        for e in events:
            if not (isinstance(e, dp_event.SelfComposedDpEvent) and e.count >= 0):
                raise ValueError(f"ledger events must be SelfComposedDpEvent with count >= 0, "
                                 f"got {e!r}.")
        self._params = params
        self._events = list(events)
        self._revision = 0
        self._cache: tuple[tuple[int, int], float] | None = None

    @classmethod
    def from_config(cls, config_like: object) -> PrivacyLedger:
        return cls(DpParams.from_config(config_like))

    @property
    def params(self) -> DpParams:
        return self._params

    @property
    def events(self) -> tuple[dp_event.SelfComposedDpEvent, ...]:
        return tuple(self._events)

    @property
    def event(self) -> dp_event.ComposedDpEvent:
        """Everything spent so far as one DpEvent (for dp_accounting directly)."""
        return dp_event.ComposedDpEvent(list(self._events))

    @property
    def steps(self) -> int:
        return sum(e.count for e in self._events)

    @property
    def revision(self) -> int:
        """Bumped whenever the parameters (hence the step mechanism) change."""
        return self._revision

    def _extended(self, n: int) -> list[dp_event.SelfComposedDpEvent]:
        events, n = list(self._events), int(n)
        if n == 0:
            return events
        step = self._params.step_event()
        if events and events[-1].event == step:
            events[-1] = dp_event.SelfComposedDpEvent(step, events[-1].count + n)
        else:
            events.append(dp_event.SelfComposedDpEvent(step, n))
        return events

    def record_steps(self, n: int = 1) -> None:
        """Records n more steps of the current mechanism."""
        check_steps(n)
        self._events = self._extended(n)

    def _epsilon_of(self, events: list[dp_event.SelfComposedDpEvent]) -> float:
        p = self._params
        return epsilon_of_event(dp_event.ComposedDpEvent(events), p.delta, p.accountant,
                                pld_discretization=p.pld_discretization)

    def epsilon(self) -> float:
        """Epsilon of everything recorded, at the ledger's delta."""
        key = (self._revision, self.steps)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self._epsilon_of(self._events))
        return self._cache[1]

    def epsilon_after(self, n: int) -> float:
        """Epsilon if n more steps of the current mechanism were recorded."""
        check_steps(n)
        return self._epsilon_of(self._extended(n))

    def check_compatible(self, config_like: object, *, compose: bool = False) -> tuple[str, ...]:
        """Refuses a resume whose DP hyperparameters differ, unless ``compose=True``.

        With ``compose=True`` the new parameters replace the old ones: later steps are
        recorded as a new mechanism composed after the old events, which stay, and
        epsilon is recomputed over all of them (under the new delta/accountant).
        Returns the differences (empty when compatible).
        """
        new = DpParams.from_config(config_like)
        diffs = self._params.differences(new)
        if diffs and not compose:
            raise LedgerMismatchError(
                "DP hyperparameters differ from the checkpointed privacy ledger ("
                f"{self.steps} steps, epsilon={self.epsilon():.4g}):\n  " + "\n  ".join(diffs)
                + "\nRestore the original values, or resume with compose=True to compose "
                "the new mechanism with the steps already taken (epsilon keeps growing).")
        if diffs:
            self._params = new
            self._revision += 1
        return tuple(diffs)

    def to_dict(self) -> dict:
        """JSON-ready form; 'epsilon' is informational and recomputed on load."""
        return {"format": self.FORMAT, "params": dataclasses.asdict(self._params),
                "events": [_event_to_json(e) for e in self._events],
                "steps": self.steps, "epsilon": self.epsilon()}

    @classmethod
    def from_dict(cls, data: Mapping) -> PrivacyLedger:
        if data.get("format") != cls.FORMAT:
            raise ValueError(f"not a privacy ledger: format={data.get('format')!r}, "
                             f"expected {cls.FORMAT!r}.")
        try:
            params = DpParams(**data["params"])
        except TypeError as err:
            raise ValueError(f"corrupt privacy ledger params {data['params']!r}: {err}") from err
        ledger = cls(params, [_event_from_json(e) for e in data["events"]])
        if ledger.steps != data.get("steps", ledger.steps):
            raise ValueError(f"corrupt privacy ledger: events hold {ledger.steps} steps, "
                             f"the record says {data['steps']}.")
        return ledger

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PrivacyLedger:
        return cls.from_dict(json.loads(text))


# --------------------------------------------------------------------------- statement

DEFAULT_NOT_COVERED = (
    "data declared public: pretraining data and the data of every component trained "
    "without DP (e.g. tokenizers, refiners, evaluation feature networks)",
    "hyperparameter tuning, model selection and repeated runs on the private data "
    "(each extra run spends its own budget)",
    "labels, captions or prompts supplied at generation time: covered only if they "
    "come from public or held-out sources, never if taken from the private set",
    "the dataset size N and the DP hyperparameters, which are treated as public",
    "secrecy of the sampling seed and of the noise key: whoever knows them can undo "
    "the sampling amplification and the noise",
    "side channels (timing, memory, floating-point effects)",
)


def _mechanism(event: dp_event.SelfComposedDpEvent) -> dict:
    inner = event.event
    if isinstance(inner, dp_event.TruncatedSubsampledGaussianDpEvent):
        return {"steps": event.count, "noise_multiplier": inner.noise_multiplier,
                "sampling_prob": inner.sampling_probability,
                "dataset_size": inner.dataset_size,
                "max_batch_size": inner.truncated_batch_size}
    if isinstance(inner, dp_event.PoissonSampledDpEvent) and isinstance(
            inner.event, dp_event.GaussianDpEvent):
        return {"steps": event.count, "noise_multiplier": inner.event.noise_multiplier,
                "sampling_prob": inner.sampling_probability}
    return {"steps": event.count, "event": repr(inner)}


def privacy_report(ledger: PrivacyLedger,
                   not_covered: Sequence[str] = DEFAULT_NOT_COVERED) -> dict:
    """The privacy guarantee of a ledger as a JSON-ready dict."""
    p = ledger.params
    truncation = None
    if p.max_batch_size is not None and p.max_batch_size < p.dataset_size:
        truncation = {
            "max_batch_size": p.max_batch_size,
            "truncation_probability_per_step": truncation_probability(
                p.dataset_size, p.sampling_prob, p.max_batch_size),
            "analysis": ("TruncatedSubsampledGaussianDpEvent (random-subset truncation)"
                         if p.accountant == "pld" else
                         "untruncated RDP + total-variation coupling of the truncation")}
    return {
        "epsilon": ledger.epsilon(),
        "delta": p.delta,
        "target_epsilon": p.target_epsilon,
        "steps": ledger.steps,
        "noise_multiplier": p.noise_multiplier,
        "sampling_prob": p.sampling_prob,
        "dataset_size": p.dataset_size,
        "expected_batch_size": p.expected_batch_size,
        "accountant": p.accountant,
        "pld_discretization": p.pld_discretization if p.accountant == "pld" else None,
        "neighboring_relation": "add or remove one example of the private training set",
        "sampling": ("Poisson: each example joins each step independently with "
                     "probability sampling_prob; the draws are a deterministic function "
                     "of (seed, step)"),
        "truncation": truncation,
        "mechanism": ("Gaussian noise of std noise_multiplier * C added once per step to "
                      "the sum of per-example gradients clipped to L2 norm C"),
        "history": [_mechanism(e) for e in ledger.events],
        "not_covered": list(not_covered),
    }


def privacy_statement(ledger: PrivacyLedger,
                      not_covered: Sequence[str] = DEFAULT_NOT_COVERED) -> str:
    """Human-readable privacy statement of a ledger (see privacy_report for JSON)."""
    r = privacy_report(ledger, not_covered)
    accountant = r["accountant"].upper() + (
        f" (value_discretization_interval={r['pld_discretization']:g}, pessimistic)"
        if r["pld_discretization"] is not None else "")
    batch = (f"{r['expected_batch_size']:.6g} of N={r['dataset_size']}"
             if r["dataset_size"] is not None else "q * N (N not recorded)")
    lines = [
        f"({r['epsilon']:.4g}, {r['delta']:g})-differential privacy"
        + (f", target epsilon {r['target_epsilon']:g}" if r["target_epsilon"] else ""),
        f"  unit of privacy: {r['neighboring_relation']}",
        f"  mechanism: {r['steps']} DP-SGD steps; {r['mechanism']}",
        f"  noise_multiplier: {r['noise_multiplier']:g}; sampling_prob q: "
        f"{r['sampling_prob']:.6g}; expected batch size: {batch}",
        f"  sampling: {r['sampling']}; the seed must stay secret",
    ]
    t = r["truncation"]
    lines.append("  truncation: none (batches are never cut)" if t is None else
                 f"  truncation: batches capped at {t['max_batch_size']} examples "
                 f"(P(cut) per step {t['truncation_probability_per_step']:.3g}); "
                 f"accounted as {t['analysis']}")
    lines.append(f"  accountant: {accountant}")
    if len(r["history"]) > 1:
        lines.append("  composed mechanisms (in order):")
        lines += [f"    - {json.dumps(h, sort_keys=True)}" for h in r["history"]]
    lines.append("  NOT covered by this guarantee:")
    lines += [f"    - {item}" for item in r["not_covered"]]
    return "\n".join(lines)
