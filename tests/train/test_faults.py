"""Faults in every stage, through `python -m dpwave.main` on the tiny run with a fixed DP seed.

* SIGKILL in the middle of any stage, then the same command again: the run ends bit-identical to the uninterrupted
  `reference` (every stage's params_sha256, the samples' digest, metrics.json).
* SIGTERM in a training stage: it checkpoints the last step done, exits 0, and the stage resumed ends as the
  uninterrupted stage does.
* A damaged newest checkpoint: one warning line, the previous one is resumed and the stage ends as the uninterrupted
  one; a damaged only checkpoint: one error line naming it and the fix, and the stage (here the DP stage, whose
  ledger lives in it) does not start over.
* A full disk while a checkpoint, a metrics line or a summary is written: `files.DiskFullError` naming the file and
  the fix, everything written before intact, and the same command resumes once there is room.

The reference run and a kill per stage cost several tiny runs (mostly compiling the refiner, sample and evaluate
programs), so those are `slow`; the default suite keeps what builds on the session's DP reference
(tests/train/conftest.py) and on the first stage: a SIGTERM in the tokenizer, the damaged checkpoints, the full
disk. tests/train/test_resume.py kills the pretrain and DP stages and SIGTERMs the DP stage in the default suite.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import runs, seeds

from dpwave import files
from dpwave.train import hashing, loop, settings
from dpwave.train.checkpoint import Checkpointer
from dpwave.train.stages.dp_finetune import STAGE as DP_FINETUNE

RNG = seeds.rng("test_faults")  # kill and signal points; each assertion message names the one drawn
STEPS = 8  # of every training stage; a checkpoint every 2 (runs.TINY)
FAULTS = {"tokenizer.steps": STEPS, "pretrain.steps": STEPS, "dp.mechanism.steps": STEPS, "refiner.steps": STEPS}
TRAINING = ("tokenizer", "pretrain", "dp_finetune", "refiner")
STAGES = (*TRAINING, "sample", "evaluate")
OUTPUTS = {"sample": ("samples.png",), "evaluate": ("metrics.json", "report.md", "privacy_statement.txt")}


def _slow_but(*fast: str, among: tuple[str, ...] = STAGES) -> list:
    return [stage if stage in fast else pytest.param(stage, marks=pytest.mark.slow) for stage in among]


def _cli(workdir: Path, cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run(runs.cli_args(workdir, FAULTS), cwd=runs.REPO, env=runs.subprocess_env(cache),
                          capture_output=True, text=True, timeout=900)


def _result(workdir: Path) -> dict:
    """What an uninterrupted run must reproduce bit for bit: every stage's digest and the metrics."""
    summaries = {name: loop.read_summary(str(workdir / name)) for name in STAGES}
    out = {name: summaries[name]["params_sha256"] for name in TRAINING}
    out["samples_sha256"] = summaries["sample"]["samples_sha256"]
    out["metrics"] = json.loads((workdir / "metrics.json").read_text())
    return out


@pytest.fixture(scope="module")
def reference(compile_cache, tmp_path_factory) -> Path:
    """The uninterrupted run."""
    workdir = tmp_path_factory.mktemp("faults") / "reference"
    done = _cli(workdir, compile_cache)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir


def _up_to(reference: Path, stage: str, tmp_path: Path) -> Path:
    """A copy of the reference whose stages before `stage` are finished and the others not started."""
    workdir = Path(shutil.copytree(reference, tmp_path / "run"))
    for name in STAGES[STAGES.index(stage):]:
        shutil.rmtree(workdir / name)
        for output in OUTPUTS.get(name, ()):
            (workdir / output).unlink()
    return workdir


def _midway(workdir: Path, stage: str, log: Path) -> tuple[Callable[[], bool], str]:
    """When a kill lands in the middle of `stage`, and where that is (for the messages)."""
    stage_dir = workdir / stage
    if stage in TRAINING:
        at = RNG.randint(3, STEPS - 3)  # after the first checkpoint (step 2), a few steps before the last
        return (lambda: bool(runs.committed_checkpoints(stage_dir))
                and max(runs.logged_steps(stage_dir), default=0) >= at), f"{stage} step {at}"
    delay, started = RNG.uniform(0.2, 1.5), []

    def ready() -> bool:
        if not started and f"stage {stage}: starting" in log.read_text():
            started.append(time.monotonic())
        return bool(started) and time.monotonic() > started[0] + delay

    return ready, f"{stage}, {delay:.2f} s in"


@pytest.mark.integration
@pytest.mark.parametrize("stage", _slow_but())
def test_a_run_killed_in_any_stage_ends_bit_identical(reference, compile_cache, tmp_path, stage):
    workdir = _up_to(reference, stage, tmp_path)
    log = tmp_path / "killed.txt"
    ready, where = _midway(workdir, stage, log)
    code = runs.signal_when(runs.cli_args(workdir, FAULTS), runs.subprocess_env(compile_cache), log, ready,
                            signal.SIGKILL)
    assert code == -signal.SIGKILL and not (workdir / stage / "summary.json").exists(), f"killed at {where}"
    newest = runs.committed_checkpoints(workdir / stage)[-1:] if stage in TRAINING else []
    logged = len(runs.logged_steps(workdir / stage))
    rerun = _cli(workdir, compile_cache)
    assert rerun.returncode == 0, f"killed at {where}: {rerun.stderr[-3000:]}"
    if newest:  # resumed from the newest checkpoint: the rerun's first logged step is the one after it
        assert runs.logged_steps(workdir / stage)[logged] == newest[0] + 1, f"killed at {where}"
    assert _result(workdir) == _result(reference), f"killed at {where}"


@pytest.mark.integration
# Slow for every stage: the same loop code's SIGTERM path is in the default suite through the DP stage
# (tests/train/test_resume.py).
@pytest.mark.parametrize("stage", _slow_but(among=TRAINING))
def test_sigterm_in_a_training_stage_checkpoints_and_exits_zero(request, compile_cache, tmp_path, stage):
    workdir, uninterrupted = tmp_path / "run", tmp_path / "uninterrupted"
    if stage != "tokenizer":  # the first stage needs no earlier one
        workdir = _up_to(request.getfixturevalue("reference"), stage, tmp_path)
        shutil.copytree(workdir, uninterrupted)
    stage_dir, log, at = workdir / stage, tmp_path / "terminated.txt", RNG.randint(2, 4)
    code = runs.signal_when(runs.cli_args(workdir, FAULTS), runs.subprocess_env(compile_cache), log,
                            lambda: max(runs.logged_steps(stage_dir), default=0) >= at, signal.SIGTERM)
    assert code == 0 and "preempted" in log.read_text(), log.read_text()[-3000:]
    saved, done = runs.committed_checkpoints(stage_dir)[-1], runs.logged_steps(stage_dir)[-1]
    assert at <= saved == done < STEPS, (at, saved, done)
    assert not (stage_dir / "summary.json").exists()
    config = runs.tiny_config(FAULTS)
    resumed = runs.run_stage(config, workdir, stage).summary
    assert resumed["params_sha256"] == runs.run_stage(config, uninterrupted, stage).summary["params_sha256"], \
        f"SIGTERM at step {at}"


def _unfinished(workdir: Path, stage: str) -> list[int]:
    """Makes finished `stage` unfinished (its checkpoints kept); its checkpoint steps."""
    for name in (loop.SUMMARY, loop.PRIVATE_TIMING):
        (workdir / stage / name).unlink(missing_ok=True)
    return runs.committed_checkpoints(workdir / stage)


def _damage(step_dir: Path, how: str) -> None:
    if how == "truncated":
        for path in (step_dir / "state").rglob("*"):
            if path.is_file() and "d" in path.parent.parts:  # OCDBT array data under state/**/d/
                os.truncate(path, 3)
    else:  # half-written: the JSON item never made it
        shutil.rmtree(step_dir / "meta")


@pytest.mark.integration
@pytest.mark.parametrize("how", ["half_written", pytest.param("truncated", marks=pytest.mark.slow)])
def test_a_damaged_newest_checkpoint_falls_back_with_one_warning_line(dp_reference, compile_cache, tmp_path, how):
    """The DP stage of the session's reference (tests/train/conftest.py), its final checkpoint damaged."""
    workdir = Path(shutil.copytree(dp_reference.workdir, tmp_path / "run"))
    stage, log = workdir / "dp_finetune", tmp_path / "rerun.txt"
    *_, previous, newest = _unfinished(workdir, "dp_finetune")
    _damage(stage / "checkpoints" / str(newest), how)
    logged = len(runs.logged_steps(stage))
    runs.signal_when(runs.cli_args(workdir), runs.subprocess_env(compile_cache), log,  # stopped in the next stage
                     lambda: (stage / loop.SUMMARY).exists(), signal.SIGKILL)
    warnings = [line for line in runs.message_lines(log.read_text()) if line.startswith("warning: ")]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(
        f"warning: Checkpoint step {newest} in {stage / 'checkpoints'} could not be restored ("), warnings
    assert f"); resuming from step {previous}, the newest readable one (set aside as " in warnings[0]
    assert runs.logged_steps(stage)[logged] == previous + 1
    summary = loop.read_summary(str(stage))
    for key in ("final_step", "params_sha256", "epsilon", "ledger"):
        assert summary[key] == dp_reference.summary[key], key
    # The damaged one was set aside and the step saved again: the next stages read the final parameters.
    assert [p.name.split("-")[1] for p in (stage / "checkpoints").glob("unreadable-*")] == [str(newest)]
    final = DP_FINETUNE.restore_params(settings.read(runs.tiny_config()), str(stage))
    assert hashing.params_sha256(final) == dp_reference.summary["params_sha256"]


@pytest.mark.integration
def test_a_damaged_only_checkpoint_stops_the_dp_stage_in_one_line(dp_reference, compile_cache, tmp_path):
    workdir = Path(shutil.copytree(dp_reference.workdir, tmp_path / "run"))
    stage = workdir / "dp_finetune"
    *older, only = _unfinished(workdir, "dp_finetune")
    for step in older:
        shutil.rmtree(stage / "checkpoints" / str(step))
    _damage(stage / "checkpoints" / str(only), "truncated")
    before = sorted(p.name for p in (stage / "checkpoints").iterdir()), (stage / "metrics.jsonl").read_bytes()
    rerun = subprocess.run(runs.cli_args(workdir), cwd=runs.REPO, env=runs.subprocess_env(compile_cache),
                           capture_output=True, text=True, timeout=900)
    lines = runs.message_lines(rerun.stderr)
    assert rerun.returncode == 1 and "Traceback" not in rerun.stderr, rerun.stderr[-3000:]
    assert lines[-1].startswith(
        f"dpwave.main: stage 'dp_finetune': none of the checkpoints [{only}] in {stage / 'checkpoints'} could be "
        f"restored (the newest, {stage / 'checkpoints' / str(only)}: "), lines[-1]
    assert lines[-1].endswith(
        f"restore that folder from a copy and rerun the same command, or delete {stage} to train the stage again "
        "from step 0 (for the DP stage that starts a new privacy ledger that does not count the steps already taken "
        "on the private data: the run's privacy cost is then the new ledger's plus whatever the lost run released)")
    assert not [line for line in lines[:-1] if line.startswith(("error", "warning"))], lines
    # Not started over: no step taken, nothing saved or finished.
    assert (sorted(p.name for p in (stage / "checkpoints").iterdir()), (stage / "metrics.jsonl").read_bytes()) \
        == before
    assert not (stage / "summary.json").exists()


# A full disk. The write path is made to fail with ENOSPC where a test can do that anywhere (the summary's fsync, a
# metrics line's write); checkpoints are written by TensorStore, outside Python, so those tests fill a small tmpfs.

@pytest.mark.unit
def test_a_summary_write_on_a_full_disk_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    files.write_json(path, {"step": 1})

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(files.DiskFullError) as error:
        files.write_json(path, {"step": 2})
    assert str(error.value) == (f"No space left on device writing {path}; what was written before is intact: free "
                                "space (or move the workdir) and rerun the same command to resume")
    assert json.loads(path.read_text()) == {"step": 1} and os.listdir(tmp_path) == ["summary.json"]


@pytest.mark.unit
def test_a_metrics_line_on_a_full_disk_leaves_whole_lines(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    real_write = os.write
    with files.Appender(path) as out:
        out.write('{"step": 1}\n')

        def half_then_full(fd: int, data) -> int:
            if len(data) > 4:
                return real_write(fd, bytes(data[:4]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "write", half_then_full)
        with pytest.raises(files.DiskFullError, match="metrics.jsonl; what was written before is intact"):
            out.write('{"step": 2}\n')
        monkeypatch.undo()
        out.write('{"step": 2}\n')
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


class SmallDisk:
    """A 64 MiB tmpfs at `path`; `fill()` leaves it no free byte, `free()` undoes that."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._filler = path / "filler"

    def fill(self) -> None:
        with open(self._filler, "ab", buffering=0) as f:
            stat = os.statvfs(self.path)
            try:
                os.posix_fallocate(f.fileno(), 0, stat.f_bavail * stat.f_frsize)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
            while True:  # whatever fallocate left
                try:
                    f.write(b"\0" * 4096)
                except OSError:
                    break

    def free(self) -> None:
        self._filler.unlink()


@pytest.fixture
def small_disk(tmp_path) -> Iterator[SmallDisk]:
    path = tmp_path / "disk"
    path.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(path)], capture_output=True,
                           text=True) if shutil.which("mount") else None
    if mount is None or mount.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({mount.stderr.strip() if mount else 'no mount command'}); the "
                    "full-disk checkpoint tests need one (root with CAP_SYS_ADMIN)")
    try:
        yield SmallDisk(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


@pytest.mark.integration
def test_a_checkpoint_on_a_full_disk_keeps_the_previous_one(small_disk):
    state = {"w": np.arange(100_000, dtype=np.float32)}
    ckpt = Checkpointer(small_disk.path / "checkpoints")
    ckpt.save(2, state, meta={"step": 2})
    ckpt.wait_until_finished()
    small_disk.fill()
    with pytest.raises(files.DiskFullError, match="what was written before is intact"):
        ckpt.save(4, state, meta={"step": 4})
        ckpt.close()  # the save is asynchronous: its error comes at the next save or here
    assert sorted(p.name for p in (small_disk.path / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    small_disk.free()
    with Checkpointer(small_disk.path / "checkpoints") as ckpt:
        step, restored, meta = ckpt.restore_latest(state)
    assert (step, meta) == (2, {"step": 2}) and (restored["w"] == state["w"]).all()


@pytest.mark.integration
def test_a_dp_stage_on_a_full_disk_stops_and_the_same_command_resumes_it(small_disk, base_workdir, dp_reference,
                                                                       monkeypatch):
    workdir = Path(shutil.copytree(base_workdir, small_disk.path / "run"))
    save = Checkpointer.save

    def fill_after_the_first(self, step, *args, **kwargs):
        wrote = save(self, step, *args, **kwargs)
        if wrote and step == 2:
            self.wait_until_finished()
            small_disk.fill()
        return wrote

    monkeypatch.setattr(Checkpointer, "save", fill_after_the_first)
    with pytest.raises(files.DiskFullError, match="No space left on device writing .*; what was written before is "
                                                  "intact: free space"):
        runs.run_dp(runs.tiny_config(), workdir)
    monkeypatch.undo()
    stage = workdir / "dp_finetune"
    assert runs.committed_checkpoints(stage) == [2] and not (stage / "summary.json").exists()
    assert (stage / "metrics.jsonl").read_text().endswith("\n")  # whole lines only
    small_disk.free()
    result = runs.run_dp(runs.tiny_config(), workdir)
    for key in ("final_step", "params_sha256", "epsilon", "ledger"):
        assert result.summary[key] == dp_reference.summary[key], key
