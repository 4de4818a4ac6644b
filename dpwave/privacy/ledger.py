"""The privacy ledger: the DpEvents a DP run has spent, with its DP hyperparameters.

``DpParams`` holds the (public) DP hyperparameters; ``PrivacyLedger`` composes the
steps recorded under them, recomputes epsilon from the events, serializes to JSON
for checkpoints, and refuses a resume whose hyperparameters changed unless the new
mechanism is explicitly composed (``LedgerMismatchError``).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
from collections.abc import Mapping, Sequence

from dp_accounting import dp_event

from dpwave.privacy.batch_selection import PoissonSelection
from dpwave.privacy.accounting import (
    DEFAULT_NEIGHBORING, DEFAULT_PLD_DISCRETIZATION, check_accountant, check_delta, check_neighboring,
    check_noise_multiplier, check_sampling_prob, check_steps, check_target_epsilon, check_truncation, epsilon_of_event,
    step_event)


class LedgerMismatchError(ValueError):
    """Resuming with DP hyperparameters that differ from the ledger's."""


# Fields whose change alters the guarantee; a resume must keep them or compose.
_GUARANTEE_FIELDS = ("noise_multiplier", "sampling_prob", "delta", "accountant",
                     "target_epsilon", "dataset_size", "max_batch_size", "pld_discretization", "neighboring")


@dataclasses.dataclass(frozen=True)
class DpParams:
    """The DP hyperparameters a run is accounted under (all public constants).

    ``max_batch_size`` is the sampler's truncation cap B (None: never truncates).
    ``target_epsilon`` is the budget a BudgetGuard enforces.
    ``neighboring`` is the neighbouring relation: "add_or_remove_one" or "replace_one" (PLD only).
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
    neighboring: str = DEFAULT_NEIGHBORING

    def __post_init__(self) -> None:
        check_noise_multiplier(self.noise_multiplier)
        check_sampling_prob(self.sampling_prob)
        check_accountant(self.accountant, self.pld_discretization)
        check_neighboring(self.neighboring, self.accountant)
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

    @property
    def selection(self) -> PoissonSelection | None:
        """The Poisson selection of q over the N examples (None when N is not given)."""
        return None if self.dataset_size is None else PoissonSelection(self.dataset_size, self.sampling_prob)

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
                                pld_discretization=p.pld_discretization, neighboring=p.neighboring)

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

    def check_compatible(self, new: DpParams, *, compose: bool = False) -> tuple[str, ...]:
        """Refuses a resume whose DP hyperparameters ``new`` differ, unless ``compose=True``.

        With ``compose=True`` the new parameters replace the old ones: later steps are
        recorded as a new mechanism composed after the old events, which stay, and
        epsilon is recomputed over all of them (under the new delta/accountant).
        Returns the differences (empty when compatible).
        """
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
