"""The privacy statement: the one NOT-covered list (docs/privacy.md's is the code's), N as public, and the
neighbouring relation (add/remove one, or replace one under PLD)."""

from __future__ import annotations

from pathlib import Path

import dp_accounting
import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant

from dpwave.privacy import accounting as acc
from dpwave.privacy.ledger import DpParams, LedgerMismatchError, PrivacyLedger
from dpwave.privacy.statement import DEFAULT_NOT_COVERED, describe_step, privacy_report, privacy_statement

pytestmark = pytest.mark.unit

PRIVACY_DOC = Path(__file__).resolve().parents[2] / "docs" / "privacy.md"


def _documented_not_covered() -> list[str]:
    lines = PRIVACY_DOC.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("**What is NOT covered.**"))
    items = []
    for line in lines[start + 1:]:
        if not line.startswith("- "):
            break
        items.append(line[2:])
    return items


def test_documented_not_covered_list_is_the_statements():
    assert _documented_not_covered() == list(DEFAULT_NOT_COVERED)


@pytest.mark.parametrize("needle", [
    "memorization_ratio", "dp.operations.log_private_metrics", "Secrecy of the DP seed", "NOT secret", "wall time",
    "Timing", "treated as public", "Hyperparameter tuning", "Public data", "Sampling prompts",
])
def test_statement_lists_every_item_that_is_not_covered(needle):
    ledger = PrivacyLedger(DpParams(1.0, 0.02, 1e-5, dataset_size=5000))
    ledger.record_steps(10)
    text = privacy_statement(ledger)
    assert needle in text.split("NOT covered by this guarantee:")[1]


def test_statement_says_n_is_public_and_what_add_or_remove_one_implies():
    ledger = PrivacyLedger(DpParams(1.0, 0.02, 1e-5, dataset_size=5000))
    ledger.record_steps(10)
    lines = privacy_statement(ledger).splitlines()
    assert lines[1] == "  unit of privacy: add or remove one example of the private training set"
    assert lines[2].startswith("  dataset size: N is treated as public and written out")
    assert "not whether N counts it" in lines[2] and "replace_one" in lines[2]
    assert privacy_report(ledger)["neighboring"] == "add_or_remove_one"


@pytest.mark.parametrize("truncated", [False, True])
def test_replace_one_is_accounted_by_pld_with_dp_accountings_relation(truncated):
    size, batch = (5000, 140) if truncated else (None, None)
    params = DpParams(1.0, 0.02, 1e-5, dataset_size=size, max_batch_size=batch, neighboring="replace_one")
    ledger = PrivacyLedger(params)
    ledger.record_steps(200)
    accountant = pld_privacy_accountant.PLDAccountant(dp_accounting.NeighboringRelation.REPLACE_ONE,
                                                      value_discretization_interval=1e-3)
    accountant.compose(dp_event.SelfComposedDpEvent(params.step_event(), 200))
    assert ledger.epsilon() == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-12)
    add_remove = acc.epsilon(1.0, 0.02, 200, 1e-5, dataset_size=size, max_batch_size=batch)
    assert ledger.epsilon() > add_remove
    text = privacy_statement(ledger)
    assert "unit of privacy: replace one example of the private training set by another" in text
    assert "N is the same on both neighbours" in text


def test_replace_one_calibration_and_refusals():
    sigma = acc.calibrate_noise(2.0, 1e-5, 0.02, 200, neighboring="replace_one")
    assert 1.98 <= acc.epsilon(sigma, 0.02, 200, 1e-5, neighboring="replace_one") <= 2.0
    assert sigma > acc.calibrate_noise(2.0, 1e-5, 0.02, 200)
    with pytest.raises(ValueError, match="needs accountant='pld'"):
        DpParams(1.0, 0.02, 1e-5, accountant="rdp", neighboring="replace_one")
    with pytest.raises(ValueError, match="neighboring='swap' is unknown"):
        acc.epsilon(1.0, 0.02, 10, 1e-5, neighboring="swap")
    ledger = PrivacyLedger(DpParams(1.0, 0.02, 1e-5))
    ledger.record_steps(5)
    with pytest.raises(LedgerMismatchError, match="neighboring: 'add_or_remove_one'"):
        ledger.check_compatible(DpParams(1.0, 0.02, 1e-5, neighboring="replace_one"))


def test_a_ledger_written_before_the_relation_was_recorded_reads_as_add_or_remove_one():
    ledger = PrivacyLedger(DpParams(1.0, 0.02, 1e-5))
    ledger.record_steps(5)
    data = ledger.to_dict()
    del data["params"]["neighboring"]
    restored = PrivacyLedger.from_dict(data)
    assert restored.params.neighboring == "add_or_remove_one" and restored.epsilon() == ledger.epsilon()


def test_mechanism_sentences_follow_the_accounted_event():
    plain = PrivacyLedger(DpParams(1.0, 0.02, 1e-5, dataset_size=5000))
    cut = PrivacyLedger(DpParams(1.0, 0.02, 1e-5, dataset_size=5000, max_batch_size=140))
    for ledger in (plain, cut):
        ledger.record_steps(10)
    assert "Poisson" in privacy_report(plain)["sampling"] and "cut" not in privacy_report(plain)["sampling"]
    assert "larger than 140 examples is cut" in privacy_report(cut)["sampling"]
    assert "clipped to L2 norm C" in privacy_report(cut)["mechanism"]
    laplace = dp_event.PoissonSampledDpEvent(0.02, dp_event.LaplaceDpEvent(1.0))
    with pytest.raises(ValueError, match="cannot describe the DP event"):
        describe_step(laplace)
