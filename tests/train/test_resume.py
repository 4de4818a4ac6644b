"""Resume exactness of the stage loop: SIGKILL, SIGTERM, a damaged checkpoint, changed DP settings,
and the budget guard. Data order, Poisson draws and noise are functions of (seed, step), so every
interrupted run must end bit-identical to the uninterrupted one (`dp_reference`)."""

from __future__ import annotations

import logging
import shutil
import signal
from pathlib import Path

import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from helpers import seeds
from helpers import runs

from dpwave.train import loop

from dpwave import privacy

pytestmark = pytest.mark.integration

RNG = seeds.rng("test_resume")  # kill steps: drawn from the test seed; the chosen step is in every message


@pytest.fixture(scope="module")
def killed_dp_workdir(base_workdir, compile_cache, tmp_path_factory) -> tuple[Path, int]:
    """A workdir whose DP stage (run by `python -m dpwave.main`) was SIGKILLed at a random step after
    its second committed checkpoint; returns (workdir, step at which the kill was sent)."""
    workdir = Path(shutil.copytree(base_workdir, tmp_path_factory.mktemp("killed") / "run"))
    stage = workdir / "dp_finetune"
    kill_at = RNG.randint(5, runs.TINY["dp.mechanism.steps"] - 3)

    def ready() -> bool:
        return len(runs.committed_checkpoints(stage)) >= 2 and max(runs.logged_steps(stage), default=0) >= kill_at

    code = runs.signal_when(runs.cli_args(workdir), runs.subprocess_env(compile_cache),
                               workdir.parent / "log.txt", ready, signal.SIGKILL)
    assert code == -signal.SIGKILL, f"kill at step {kill_at}"
    assert not (stage / "summary.json").exists(), f"the stage finished before the kill at step {kill_at}"
    return workdir, kill_at


def _copy(workdir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(workdir, tmp_path / "run"))


def _resumed_from(stage: Path, rerun) -> int:
    """Reruns and returns the step it resumed from: the first step the rerun logged, minus one."""
    before = len(runs.logged_steps(stage))
    result = rerun()
    assert result.finished
    return runs.logged_steps(stage)[before] - 1


def _same_dp_result(summary: dict, reference: dict, context: str) -> None:
    for key in ("final_step", "params_sha256", "epsilon", "ledger", "steps", "noise_multiplier",
                "sampling_prob", "delta"):
        assert summary[key] == reference[key], f"{key} differs ({context})"


def test_dp_stage_resumes_bit_exactly_after_sigkill(killed_dp_workdir, dp_reference, tmp_path):
    killed, kill_at = killed_dp_workdir
    workdir = _copy(killed, tmp_path)
    stage = workdir / "dp_finetune"
    newest = runs.committed_checkpoints(stage)[-1]
    start = _resumed_from(stage, lambda: runs.run_dp(runs.tiny_config(), workdir))
    assert 2 <= start == newest, f"kill at step {kill_at}: resumed from {start}, newest checkpoint {newest}"
    _same_dp_result(loop.read_summary(str(stage)), dp_reference.summary, f"killed at step {kill_at}")


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(killed_dp_workdir, dp_reference,
                                                                    tmp_path, caplog):
    workdir = _copy(killed_dp_workdir[0], tmp_path)
    stage = workdir / "dp_finetune"
    *_, previous, newest = runs.committed_checkpoints(stage)
    data_files = [p for p in (stage / "checkpoints" / str(newest) / "state").rglob("*")
                  if p.is_file() and "d" in p.parent.parts]  # OCDBT array data under state/**/d/
    assert data_files
    for path in data_files:
        with open(path, "r+b") as f:
            f.truncate(3)
    with caplog.at_level(logging.WARNING):
        start = _resumed_from(stage, lambda: runs.run_dp(runs.tiny_config(), workdir))
    assert start == previous
    assert any(f"step {newest}" in r.getMessage() and "could not be restored" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)
    _same_dp_result(loop.read_summary(str(stage)), dp_reference.summary, "after fallback")


def test_sigterm_saves_the_current_step_exits_zero_and_the_rerun_finishes(workdir, compile_cache,
                                                                         dp_reference):
    stage = workdir / "dp_finetune"
    signal_at = RNG.randint(1, runs.TINY["dp.mechanism.steps"] - 3)
    code = runs.signal_when(runs.cli_args(workdir), runs.subprocess_env(compile_cache),
                               workdir.parent / "log.txt",
                               lambda: max(runs.logged_steps(stage), default=0) >= signal_at, signal.SIGTERM)
    log = (workdir.parent / "log.txt").read_text()
    assert code == 0, log[-3000:]
    assert "preempted" in log and not (stage / "summary.json").exists()
    saved, last_done = runs.committed_checkpoints(stage)[-1], runs.logged_steps(stage)[-1]
    # The checkpoint holds the last step completed (nothing done after the signal is lost), and the
    # process stopped at the step boundary after the signal instead of running on to the end.
    assert signal_at <= saved == last_done < runs.TINY["dp.mechanism.steps"], (signal_at, saved, last_done)
    start = _resumed_from(stage, lambda: runs.run_dp(runs.tiny_config(), workdir))
    assert start == saved
    _same_dp_result(loop.read_summary(str(stage)), dp_reference.summary, f"SIGTERM at step {signal_at}")


def test_public_stage_resumes_bit_exactly_after_sigkill(base_workdir, compile_cache, tmp_path):
    steps = {"pretrain.steps": 8}
    config = runs.tiny_config(steps)
    killed, reference = (Path(shutil.copytree(base_workdir, tmp_path / name)) for name in ("killed", "reference"))
    for workdir in (killed, reference):
        shutil.rmtree(workdir / "pretrain")
    stage = killed / "pretrain"
    kill_at = RNG.randint(3, 6)

    def ready() -> bool:
        return bool(runs.committed_checkpoints(stage)) and max(runs.logged_steps(stage), default=0) >= kill_at

    code = runs.signal_when(runs.cli_args(killed, steps), runs.subprocess_env(compile_cache),
                               tmp_path / "log.txt", ready, signal.SIGKILL)
    assert code == -signal.SIGKILL and not (stage / "summary.json").exists(), f"kill at step {kill_at}"
    newest = runs.committed_checkpoints(stage)[-1]
    start = _resumed_from(stage, lambda: runs.run_pretrain(config, killed))
    assert start == newest, f"kill at step {kill_at}"
    want = runs.run_pretrain(config, reference).summary
    got = loop.read_summary(str(stage))
    assert (got["final_step"], got["params_sha256"]) == (8, want["params_sha256"]), f"kill at step {kill_at}"


def test_budget_guard_stops_at_the_target_epsilon(workdir):
    # sigma 1, q = 16/400 (PLD, delta 1e-5): epsilon 1.074 after 3 steps, 1.139 after 4.
    target = 1.1
    config = runs.tiny_config({"dp.mechanism.steps": 50, "dp.mechanism.target_epsilon": target})
    summary = runs.run_dp(config, workdir).summary
    taken = summary["final_step"]
    assert summary["stopped_early"] and summary["steps"] == taken < 50
    eps = lambda steps: privacy.epsilon(1.0, 16 / 400, steps, 1e-5, dataset_size=400)
    assert summary["epsilon"] == pytest.approx(eps(taken), rel=1e-9) and summary["epsilon"] <= target
    assert eps(taken + 1) > target


@pytest.mark.parametrize("change,message", [
    ({"dp.mechanism.noise_multiplier": 2.0}, "noise_multiplier: 1.0 (ledger) -> 2.0 (new config)"),
    ({"dp.mechanism.expected_batch_size": 20}, "sampling_prob: 0.04 (ledger) -> 0.05 (new config)"),
])
def test_resume_with_changed_dp_hyperparameters_is_refused(dp_reference, tmp_path, change, message):
    workdir = _copy(dp_reference.workdir, tmp_path)
    with pytest.raises(privacy.LedgerMismatchError) as error:
        runs.run_dp(runs.tiny_config({**change, "dp.mechanism.steps": 12}), workdir)
    assert message in str(error.value) and "compose" in str(error.value)


def test_compose_on_resume_composes_the_new_mechanism(dp_reference, tmp_path):
    workdir = _copy(dp_reference.workdir, tmp_path)
    config = runs.tiny_config({"dp.mechanism.noise_multiplier": 2.0, "dp.mechanism.steps": 12,
                               "dp.operations.compose_on_resume": True})
    summary = runs.run_dp(config, workdir).summary
    assert summary["final_step"] == summary["steps"] == 12
    history = summary["privacy"]["history"]
    assert [(h["steps"], h["noise_multiplier"]) for h in history] == [(10, 1.0), (2, 2.0)]
    step = lambda sigma: dp_event.PoissonSampledDpEvent(16 / 400, dp_event.GaussianDpEvent(sigma))
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
    accountant.compose(dp_event.ComposedDpEvent([dp_event.SelfComposedDpEvent(step(1.0), 10),
                                                 dp_event.SelfComposedDpEvent(step(2.0), 2)]))
    assert summary["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    # More than the 10 steps already taken; less than two more sigma=1 steps would cost.
    assert dp_reference.summary["epsilon"] < summary["epsilon"] < privacy.epsilon(1.0, 16 / 400, 12, 1e-5)
