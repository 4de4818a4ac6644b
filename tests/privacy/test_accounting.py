"""Accounting: epsilon, noise calibration, truncated Poisson, ledger, privacy statement."""

import dataclasses
import json
import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import stats

from dpwave.privacy import accounting as acc
from dpwave.privacy.ledger import DpParams, LedgerMismatchError, PrivacyLedger
from dpwave.privacy.statement import privacy_report, privacy_statement

pytestmark = pytest.mark.unit

MNIST_Q = 256 / 60_000
ADD_REMOVE = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE


def direct_epsilon(event, delta, accountant, count=1, discretization=1e-3):
    """dp_accounting called directly (compose with an explicit count)."""
    if accountant == "pld":
        a = pld_privacy_accountant.PLDAccountant(ADD_REMOVE, discretization)
    else:
        a = rdp_privacy_accountant.RdpAccountant(neighboring_relation=ADD_REMOVE)
    a.compose(event, count)
    return a.get_epsilon(delta)


def poisson_gaussian(sigma, q):
    return dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))


# ----------------------------------------------------------------------------- epsilon


@pytest.mark.parametrize("accountant, expected", [("rdp", 2.60), ("pld", 2.39)])
def test_known_mnist_setting(accountant, expected):
    # N=60,000, expected batch 256, sigma 1.1, 60 epochs = 14,062 steps, delta 1e-5.
    eps = acc.epsilon(1.1, MNIST_Q, 14_062, 1e-5, accountant, dataset_size=60_000)
    assert round(eps, 2) == expected


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
@pytest.mark.parametrize("sigma, q, steps", [(0.8, 0.01, 500), (2.0, 0.3, 40), (1.3, 1.0, 7)])
def test_matches_dp_accounting_directly(accountant, sigma, q, steps):
    ours = acc.epsilon(sigma, q, steps, 1e-6, accountant)
    theirs = direct_epsilon(poisson_gaussian(sigma, q), 1e-6, accountant, count=steps)
    assert ours == pytest.approx(theirs, rel=1e-9)


def test_default_pld_discretization_is_1e3_and_tighter_one_is_close():
    coarse = acc.epsilon(1.0, 0.01, 300, 1e-5, "pld")
    assert coarse == pytest.approx(direct_epsilon(poisson_gaussian(1.0, 0.01), 1e-5, "pld", 300))
    fine = acc.epsilon(1.0, 0.01, 300, 1e-5, "pld", pld_discretization=1e-4)
    assert fine <= coarse <= fine * 1.02  # pessimistic rounding: coarser is never smaller


def test_zero_steps_and_zero_noise():
    assert acc.epsilon(1.0, 0.1, 0, 1e-5) == 0.0
    assert acc.epsilon(0.0, 0.1, 10, 1e-5, "pld") == math.inf
    assert acc.epsilon(0.0, 0.1, 10, 1e-5, "rdp") == math.inf


# ----------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
@pytest.mark.parametrize("target, q, steps", [(1.0, 0.01, 1000), (8.0, 0.004, 10_000),
                                              (3.0, 0.1, 50)])
def test_calibrated_sigma_is_at_most_target_and_within_one_percent(accountant, target, q, steps):
    sigma = acc.calibrate_noise(target, 1e-5, q, steps, accountant)
    eps = acc.epsilon(sigma, q, steps, 1e-5, accountant)
    assert 0.99 * target <= eps <= target


def test_calibration_with_truncation_uses_the_truncated_event():
    sigma = acc.calibrate_noise(2.0, 1e-5, 0.01, 500, dataset_size=5000, max_batch_size=60)
    eps = acc.epsilon(sigma, 0.01, 500, 1e-5, dataset_size=5000, max_batch_size=60)
    assert 0.99 * 2.0 <= eps <= 2.0


def test_calibration_refuses_unreachable_and_absurd_targets():
    # PLD discretization puts a floor under epsilon for very many steps.
    with pytest.raises(ValueError, match="unreachable"):
        acc.calibrate_noise(1e-4, 1e-5, 1.0, 100, "pld")
    with pytest.raises(ValueError, match="too large"):
        acc.calibrate_noise(1e6, 1e-5, 0.001, 10, "rdp")
    with pytest.raises(ValueError, match="steps=0"):
        acc.calibrate_noise(1.0, 1e-5, 0.01, 0)


# ----------------------------------------------------------------------------- truncation


def test_truncation_probability_is_the_binomial_tail_of_the_larger_neighbour():
    n, q, b = 2000, 0.02, 50
    direct = sum(stats.binom.pmf(k, n + 1, q) for k in range(b + 1, n + 2))
    assert acc.truncation_probability(n, q, b) == pytest.approx(direct, rel=1e-9)


def test_step_event_reflects_truncation():
    plain = acc.step_event(1.0, 0.01)
    assert plain == poisson_gaussian(1.0, 0.01)
    assert acc.step_event(1.0, 0.01, dataset_size=100, max_batch_size=100) == plain
    cut = acc.step_event(1.0, 0.01, dataset_size=5000, max_batch_size=70)
    assert cut == dp_accounting.TruncatedSubsampledGaussianDpEvent(5000, 0.01, 70, 1.0)


def test_pld_truncated_matches_dp_accounting_event():
    event = dp_accounting.TruncatedSubsampledGaussianDpEvent(5000, 0.01, 60, 0.9)
    ours = acc.epsilon(0.9, 0.01, 400, 1e-5, "pld", dataset_size=5000, max_batch_size=60)
    assert ours == pytest.approx(direct_epsilon(event, 1e-5, "pld", count=400), rel=1e-9)


def test_rdp_truncation_bound_adds_the_tail_mass_to_delta():
    n, q, b, sigma, steps, delta = 5000, 0.01, 97, 1.0, 400, 1e-5
    tau = steps * acc.truncation_probability(n, q, b)
    assert 1e-8 < tau < 1e-6  # visible but affordable
    plain = acc.epsilon(sigma, q, steps, delta, "rdp")
    cut = acc.epsilon(sigma, q, steps, delta, "rdp", dataset_size=n, max_batch_size=b)
    assert cut > plain
    # The reported eps satisfies its own condition: untruncated at the reduced delta <= eps ...
    # ... and is tight: no smaller eps would.
    reduced = delta - (1 + math.exp(cut)) * tau
    untruncated = direct_epsilon(poisson_gaussian(sigma, q), reduced, "rdp", steps)
    assert untruncated <= cut <= untruncated * (1 + 1e-5)


def test_rdp_truncation_refuses_when_tail_exceeds_delta():
    with pytest.raises(ValueError, match="truncation probability mass"):
        acc.epsilon(1.0, 0.01, 400, 1e-5, "rdp", dataset_size=5000, max_batch_size=75)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("kwargs, match", [
    (dict(noise_multiplier=-0.1), "noise_multiplier=-0.1"),
    (dict(noise_multiplier=math.nan), "noise_multiplier=nan"),
    (dict(sampling_prob=0.0), "sampling_prob=0.0"),
    (dict(sampling_prob=1.5), "sampling_prob=1.5"),
    (dict(steps=-1), "steps=-1"),
    (dict(steps=2.5), "steps=2.5"),
    (dict(delta=0.0), "delta=0.0"),
    (dict(delta=1.0), "delta=1.0"),
    (dict(accountant="moments"), "accountant='moments'"),
    (dict(pld_discretization=0.0), "pld_discretization=0.0"),
    (dict(max_batch_size=64), "needs dataset_size"),
    (dict(dataset_size=1000, max_batch_size=0), "max_batch_size=0"),
    (dict(dataset_size=1000, delta=0.01), "allow_large_delta=True"),
])
def test_epsilon_bad_inputs(kwargs, match):
    args = dict(noise_multiplier=1.0, sampling_prob=0.01, steps=10, delta=1e-5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        acc.epsilon(**args)


@pytest.mark.parametrize("target", [0.0, -1.0, math.inf])
def test_calibrate_bad_target(target):
    with pytest.raises(ValueError, match="target_epsilon"):
        acc.calibrate_noise(target, 1e-5, 0.01, 100)


def test_large_delta_warns_loudly():
    with pytest.warns(acc.LargeDeltaWarning, match="WEAK PRIVACY"):
        acc.epsilon(1.0, 0.01, 10, 1e-3, dataset_size=1000)  # delta == 1/N
    with pytest.warns(acc.LargeDeltaWarning):
        acc.epsilon(1.0, 0.01, 10, 0.01, dataset_size=1000, allow_large_delta=True)


# ----------------------------------------------------------------------------- ledger


@pytest.fixture
def params():
    return DpParams(noise_multiplier=1.1, sampling_prob=0.02, delta=1e-5,
                    target_epsilon=3.0, dataset_size=5000)


def test_record_steps_merges_consecutive_identical_steps(params):
    ledger = PrivacyLedger(params)
    assert ledger.epsilon() == 0.0
    for n in (1, 5, 94):
        ledger.record_steps(n)
    assert ledger.steps == 100
    assert ledger.events == (dp_accounting.SelfComposedDpEvent(poisson_gaussian(1.1, 0.02), 100),)
    assert ledger.epsilon() == pytest.approx(acc.epsilon(1.1, 0.02, 100, 1e-5), rel=1e-12)
    assert ledger.epsilon_after(50) == pytest.approx(acc.epsilon(1.1, 0.02, 150, 1e-5), rel=1e-12)
    assert ledger.steps == 100  # epsilon_after does not record


def test_ledger_json_round_trip(params):
    ledger = PrivacyLedger(params)
    ledger.record_steps(120)
    ledger.check_compatible(DpParams(noise_multiplier=1.5, sampling_prob=0.01, delta=1e-5,
                                 target_epsilon=3.0, dataset_size=5000), compose=True)
    ledger.record_steps(30)
    text = ledger.to_json()
    assert json.loads(text)["steps"] == 150
    back = PrivacyLedger.from_json(text)
    assert back.events == ledger.events
    assert back.params == ledger.params
    assert back.epsilon() == ledger.epsilon()
    # Also through the dict form a checkpoint's JSON metadata holds.
    again = PrivacyLedger.from_dict(json.loads(json.dumps(ledger.to_dict())))
    assert again.epsilon() == ledger.epsilon()


def test_ledger_json_refuses_foreign_classes_and_corruption(params):
    ledger = PrivacyLedger(params)
    ledger.record_steps(3)
    data = ledger.to_dict()
    evil = json.loads(json.dumps(data))
    evil["events"][0]["event"]["module_name"] = "os"
    evil["events"][0]["event"]["class_name"] = "system"
    with pytest.raises(ValueError, match="unknown event os.system"):
        PrivacyLedger.from_dict(evil)
    wrong = dict(data, steps=4)
    with pytest.raises(ValueError, match="corrupt"):
        PrivacyLedger.from_dict(wrong)
    with pytest.raises(ValueError, match="not a privacy ledger"):
        PrivacyLedger.from_dict(dict(data, format="other"))


def test_resume_with_changed_hyperparameters_is_refused_with_the_difference(params):
    ledger = PrivacyLedger(params)
    ledger.record_steps(10)
    same = DpParams(noise_multiplier=1.1, sampling_prob=0.02, delta=1e-5, target_epsilon=3.0, dataset_size=5000)
    assert ledger.check_compatible(same) == ()
    changed = dataclasses.replace(same, noise_multiplier=1.0, delta=1e-6, accountant="rdp")
    with pytest.raises(LedgerMismatchError) as err:
        ledger.check_compatible(changed)
    message = str(err.value)
    assert "noise_multiplier: 1.1 (ledger) -> 1.0 (new config)" in message
    assert "delta: 1e-05 (ledger) -> 1e-06" in message
    assert "accountant: 'pld' (ledger) -> 'rdp'" in message
    assert "compose=True" in message
    assert isinstance(err.value, ValueError)
    assert ledger.params == params  # refused: nothing changed


def test_compose_mode_is_honest(params):
    ledger = PrivacyLedger(params)
    ledger.record_steps(200)
    before = ledger.epsilon()
    diffs = ledger.check_compatible(
        DpParams(noise_multiplier=0.9, sampling_prob=0.03, delta=1e-5, target_epsilon=3.0,
             dataset_size=5000), compose=True)
    assert len(diffs) == 2
    assert ledger.epsilon() == before  # nothing new spent yet
    ledger.record_steps(100)
    assert len(ledger.events) == 2
    composed = dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(poisson_gaussian(1.1, 0.02), 200),
        dp_accounting.SelfComposedDpEvent(poisson_gaussian(0.9, 0.03), 100)])
    expected = direct_epsilon(composed, 1e-5, "pld")
    assert ledger.epsilon() == pytest.approx(expected, rel=1e-9)
    assert ledger.epsilon() > before
    assert ledger.epsilon() > acc.epsilon(0.9, 0.03, 100, 1e-5)


def test_params_defaults_and_checks():
    p = DpParams(1.0, 64 / 2000, 1e-5, dataset_size=2000)
    assert p.selection.expected_batch_size == pytest.approx(64)
    assert p.accountant == "pld" and p.pld_discretization == 1e-3
    with pytest.raises(ValueError, match="target_epsilon=-1"):
        DpParams(1.0, 0.1, 1e-5, target_epsilon=-1)


def test_numpy_scalars_are_normalised_for_json():
    p = DpParams(np.float32(1.5), np.float64(0.01), 1e-5, target_epsilon=np.float64(2.0),
                 dataset_size=np.int64(5000), max_batch_size=np.int64(97), accountant="rdp")
    assert type(p.noise_multiplier) is float and type(p.max_batch_size) is int
    ledger = PrivacyLedger(p)
    ledger.record_steps(np.int64(3))
    assert PrivacyLedger.from_json(ledger.to_json()).steps == 3


def test_ledger_refuses_corrupt_params(params):
    data = PrivacyLedger(params).to_dict()
    data["params"]["sigma"] = 1.0
    with pytest.raises(ValueError, match="corrupt privacy ledger params"):
        PrivacyLedger.from_dict(data)


def test_ledger_records_truncated_steps():
    p = DpParams(1.0, 0.01, 1e-5, accountant="rdp", dataset_size=5000, max_batch_size=97)
    ledger = PrivacyLedger(p)
    ledger.record_steps(400)
    assert isinstance(ledger.events[0].event, dp_accounting.TruncatedSubsampledGaussianDpEvent)
    assert ledger.epsilon() == pytest.approx(acc.epsilon(
        1.0, 0.01, 400, 1e-5, "rdp", dataset_size=5000, max_batch_size=97), rel=1e-12)
    assert PrivacyLedger.from_json(ledger.to_json()).epsilon() == ledger.epsilon()


# ----------------------------------------------------------------------------- statement


def test_privacy_statement_says_what_is_and_is_not_covered(params):
    ledger = PrivacyLedger(params)
    ledger.record_steps(250)
    report = privacy_report(ledger)
    json.dumps(report)  # JSON-ready
    assert report["epsilon"] == ledger.epsilon()
    assert report["expected_batch_size"] == pytest.approx(100)
    text = privacy_statement(ledger)
    for needle in [f"{ledger.epsilon():.4g}", "1e-05", "250 DP-SGD steps", "noise_multiplier: 1.1",
                   "sampling_prob q: 0.02", "expected batch size: 100 of N=5000",
                   "add or remove one example", "Poisson", "(seed, step)",
                   "PLD (value_discretization_interval=0.001", "truncation: none",
                   "NOT covered", "Hyperparameter tuning", "pretraining", "prompts"]:
        assert needle in text, needle


def test_privacy_statement_lists_truncation_and_history():
    ledger = PrivacyLedger(DpParams(1.0, 0.01, 1e-5, accountant="rdp",
                                    dataset_size=5000, max_batch_size=100))
    ledger.record_steps(10)
    ledger.check_compatible(DpParams(noise_multiplier=2.0, sampling_prob=0.01, delta=1e-5,
                                 accountant="rdp", dataset_size=5000, max_batch_size=100),
                            compose=True)
    ledger.record_steps(5)
    text = privacy_statement(ledger, not_covered=["custom caveat"])
    assert "batches capped at 100 examples" in text and "total-variation coupling" in text
    assert "composed mechanisms" in text and '"noise_multiplier": 2.0' in text
    assert "custom caveat" in text and "hyperparameter" not in text
    assert np.isclose(privacy_report(ledger)["history"][0]["steps"], 10)
