"""dpwave.privacy.planning: proposals reach the target epsilon within 1% and rank as documented."""

import math

import pytest

from dpwave.privacy import planning
from dpwave.privacy.accounting import epsilon

pytestmark = pytest.mark.unit

N, BUDGET, DELTA = 2000, 7680, 1e-5


@pytest.fixture(scope="module")
def plans() -> dict[str, list[planning.Plan]]:
    return {c: planning.plan(2.0, DELTA, N, BUDGET, batch_sizes=[64, 256, 1024], criterion=c)
            for c in planning.CRITERIA}


def test_every_proposal_reaches_the_target_within_one_percent(plans):
    for p in plans["noise_to_signal"]:
        assert p.steps == BUDGET // p.expected_batch_size and p.sampling_prob == p.expected_batch_size / N
        assert 0.99 * 2.0 <= p.epsilon <= 2.0
        assert epsilon(p.noise_multiplier, p.sampling_prob, p.steps, DELTA) == pytest.approx(p.epsilon)
        assert p.noise_to_signal == pytest.approx(p.noise_multiplier / (p.expected_batch_size * math.sqrt(p.steps)))
    assert {p.expected_batch_size for p in plans["noise_to_signal"]} == {64, 256, 1024}


@pytest.mark.parametrize("criterion", planning.CRITERIA)
def test_ranked_by_the_criterion_with_ties_to_more_steps(plans, criterion):
    ranked = plans[criterion]
    values = [getattr(p, criterion) for p in ranked]
    best = min(values)
    ties = [p for p in ranked if getattr(p, criterion) <= best * 1.01]
    assert ranked[: len(ties)] == sorted(ties, key=lambda p: -p.steps)
    assert values[len(ties):] == sorted(values[len(ties):])
    assert all(v > best * 1.01 for v in values[len(ties):])


def test_effective_noise_prefers_few_large_steps(plans):
    # sigma grows slower than B, so sigma/B falls with the batch size.
    assert [p.expected_batch_size for p in plans["effective_noise"]] == [1024, 256, 64]


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="criterion"):
        planning.plan(1.0, DELTA, N, BUDGET, criterion="loss")
    with pytest.raises(ValueError, match="must lie in"):
        planning.plan(1.0, DELTA, N, BUDGET, batch_sizes=[4000])


def test_cli_prints_the_ranked_table(capsys):
    assert planning.main(["--epsilon", "2", "--delta", "1e-5", "--n", str(N), "--budget", str(BUDGET),
                          "--batch-sizes", "256,1024"]) == 0
    out = capsys.readouterr().out
    assert "| rank | expected batch |" in out and out.count("\n| ") == 3  # header + 2 rows
    assert "best: --config.dp.mechanism.expected_batch_size=" in out


def test_a_runs_sigma_is_the_given_one_zero_without_noise_or_calibrated_to_the_target():
    kw = {"accountant": "pld", "neighboring": "add_or_remove_one"}
    assert planning.run_noise_multiplier(1.0, 1e-5, 0.01, 100, given=0.7, **kw) == 0.7
    assert planning.run_noise_multiplier(float("inf"), 1e-5, 0.01, 100, **kw) == 0.0
    sigma = planning.run_noise_multiplier(2.0, 1e-5, 0.01, 100, **kw)
    assert 0.99 * 2.0 <= epsilon(sigma, 0.01, 100, 1e-5) <= 2.0
    # A stand-in of 500 examples for a private run of 2,000: a quarter of the sigma over a quarter of the batch.
    assert planning.tuning_noise_scale(500, 2000) == 0.25
