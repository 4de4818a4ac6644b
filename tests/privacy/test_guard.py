"""Budget guard: the step that would exceed the target is refused, the one before allowed."""

import dp_accounting
import pytest
from dp_accounting.rdp import rdp_privacy_accountant

from dpwave.privacy import accounting as acc
from dpwave.privacy.guard import BudgetGuard
from dpwave.privacy.ledger import DpParams, PrivacyLedger

pytestmark = pytest.mark.unit


def assert_is_max_steps(n, params, target, start_events=()):
    """epsilon(start + n steps) <= target < epsilon(start + n + 1 steps), asked of dp_accounting."""
    def eps(k):
        events = list(start_events) + [dp_accounting.SelfComposedDpEvent(params.step_event(), k)]
        return acc.epsilon_of_event(dp_accounting.ComposedDpEvent(events), params.delta,
                                    params.accountant)
    assert n == 0 or eps(n) <= target
    assert eps(n + 1) > target


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_guard_stops_exactly_at_the_target(accountant):
    # Target = epsilon after exactly 37 steps: step 37 must be allowed, step 38 refused.
    target = acc.epsilon(2.0, 0.05, 37, 1e-5, accountant)
    params = DpParams(2.0, 0.05, 1e-5, accountant=accountant, target_epsilon=target)
    ledger = PrivacyLedger(params)
    guard = BudgetGuard(ledger)
    assert guard.remaining_steps == 37
    taken = 0
    while guard.can_step():
        ledger.record_steps(1)
        taken += 1
    assert taken == 37 and ledger.epsilon() <= target
    assert ledger.epsilon_after(1) == acc.epsilon(2.0, 0.05, 38, 1e-5, accountant) > target


def test_guard_matches_brute_force_for_an_arbitrary_target():
    params = DpParams(1.5, 0.08, 1e-5, accountant="rdp", target_epsilon=2.5)
    guard = BudgetGuard(PrivacyLedger(params))
    assert_is_max_steps(guard.remaining_steps, params, 2.5)
    assert guard.can_step(guard.remaining_steps)
    assert not guard.can_step(guard.remaining_steps + 1)


def test_guard_is_cheap_per_step(monkeypatch):
    params = DpParams(2.0, 0.01, 1e-5, accountant="rdp", target_epsilon=1.0)
    ledger = PrivacyLedger(params)
    guard = BudgetGuard(ledger)
    remaining = guard.remaining_steps
    assert remaining > 200
    calls = []
    real = rdp_privacy_accountant.RdpAccountant.get_epsilon
    monkeypatch.setattr(rdp_privacy_accountant.RdpAccountant, "get_epsilon",
                        lambda self, d: calls.append(d) or real(self, d))
    for _ in range(200):
        assert guard.can_step()
        ledger.record_steps(1)
    assert calls == []  # no accountant call per step once the budget is known
    assert guard.remaining_steps == remaining - 200


def test_guard_recomputes_after_the_mechanism_changes():
    params = DpParams(1.0, 0.05, 1e-5, accountant="rdp", target_epsilon=3.0)
    ledger = PrivacyLedger(params)
    guard = BudgetGuard(ledger)
    ledger.record_steps(20)
    new = DpParams(3.0, 0.05, 1e-5, accountant="rdp", target_epsilon=3.0)
    ledger.check_compatible(new, compose=True)
    remaining = guard.remaining_steps
    assert remaining > 0
    assert_is_max_steps(remaining, new, 3.0, start_events=ledger.events)


def test_resumed_over_budget_ledger_refuses_the_first_step():
    params = DpParams(1.0, 0.05, 1e-5, accountant="rdp", target_epsilon=1.0)
    ledger = PrivacyLedger(params)
    ledger.record_steps(500)
    assert ledger.epsilon() > 1.0
    resumed = PrivacyLedger.from_json(ledger.to_json())
    guard = BudgetGuard(resumed)
    assert guard.remaining_steps == 0 and not guard.can_step()


def test_explicit_target_overrides_the_ledger():
    params = DpParams(2.0, 0.05, 1e-5, accountant="rdp", target_epsilon=5.0)
    guard = BudgetGuard(PrivacyLedger(params), target_epsilon=1.0)
    assert guard.target_epsilon == 1.0
    assert_is_max_steps(guard.remaining_steps, params, 1.0)


def test_guard_bad_inputs():
    no_target = PrivacyLedger(DpParams(1.0, 0.1, 1e-5, accountant="rdp"))
    with pytest.raises(ValueError, match="needs a target epsilon"):
        BudgetGuard(no_target)
    with pytest.raises(ValueError, match="target_epsilon=0"):
        BudgetGuard(no_target, target_epsilon=0)
    guard = BudgetGuard(no_target, target_epsilon=1.0)
    for n in (0, -1, 1.5):
        with pytest.raises(ValueError, match=f"n={n!r}"):
            guard.can_step(n)
