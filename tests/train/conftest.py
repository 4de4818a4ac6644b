"""Shared fixtures of the framework tests (resume, parallelism, multi-host, CLI).

* `TINY`: overrides of `experiments/configs/mnist.py:tiny` that make a DP stage take seconds: 400
  private digits, expected batch 16, an explicit noise multiplier (no calibration, and `dp.steps` can
  change without changing the mechanism), a fixed `dp.secret_seed` (bit-exact reruns), a checkpoint
  every 2 steps and a metrics line every step (progress a test can watch from outside a process).
* A persistent XLA compilation cache for the session, shared with every subprocess: each process
  still traces, lowers and runs everything itself; it only skips recompiling identical programs.
* `base_workdir`: tokenizer + AR pretraining run ONCE per session; tests copy it.
* `dp_reference`: the uninterrupted DP stage on that base, the ground truth of the resume tests.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import ml_collections
import pytest

from dpwave.train import distributed, loop, public_stages
from dpwave.train.dp_stage import DpFinetune
from experiments.configs import mnist

REPO = Path(__file__).resolve().parents[2]
TINY: dict[str, Any] = {
    "tokenizer.steps": 2, "pretrain.steps": 2, "data.private.split": "private[:400]",
    "dp.expected_batch_size": 16, "dp.microbatch_size": 8, "dp.steps": 10, "dp.noise_multiplier": 1.0,
    "dp.secret_seed": 7, "checkpoint.every_steps": 2, "checkpoint.max_to_keep": 2, "log_every_steps": 1,
}


def tiny_config(overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """`mnist.py:tiny` with `TINY` and then `overrides` ({"dp.steps": 4, ...}) applied, locked."""
    config = mnist.get_config("tiny")
    with config.unlocked():
        for path, value in {**TINY, **(overrides or {})}.items():
            *parents, leaf = path.split(".")
            node = config
            for name in parents:
                node = node[name]
            node[leaf] = value
    return config


def cli_args(workdir: Path, overrides: Mapping[str, Any] | None = None) -> list[str]:
    """`python -m dpwave.main` arguments that resolve to `tiny_config(overrides)`."""
    flags = [f"--config.{k}={v}" for k, v in {**TINY, **(overrides or {})}.items()]
    return [sys.executable, "-m", "dpwave.main", "--config=experiments/configs/mnist.py:tiny", *flags,
            f"--workdir={workdir}"]


def stage_dirs(workdir: Path) -> dict[str, str]:
    return {name: str(workdir / name) for name in ("tokenizer", "pretrain", "dp_finetune", "refiner")}


def dp_stage(config: ml_collections.ConfigDict, workdir: Path) -> DpFinetune:
    dirs = stage_dirs(workdir)
    return DpFinetune(config, distributed.make_data_mesh(), stage_dir=dirs["dp_finetune"],
                      tokenizer_dir=dirs["tokenizer"], pretrain_dir=dirs["pretrain"])


def run_dp(config: ml_collections.ConfigDict, workdir: Path) -> loop.LoopResult:
    """Runs (or resumes) the DP stage of `workdir` in this process."""
    return public_stages.run_task(config, dp_stage(config, workdir).task(), stage_dirs(workdir)["dp_finetune"])


def run_pretrain(config: ml_collections.ConfigDict, workdir: Path) -> loop.LoopResult:
    dirs = stage_dirs(workdir)
    task = public_stages.pretrain_task(config, distributed.make_data_mesh(), dirs["tokenizer"])
    return public_stages.run_task(config, task, dirs["pretrain"])


def subprocess_env(cache_dir: Path, devices: int | None = None, **extra: str) -> dict[str, str]:
    """Environment of a child JAX process: repo on the path, CPU, the shared compilation cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DPWAVE_", "SLURM_", "XLA_FLAGS"))}
    env.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", TF_CPP_MIN_LOG_LEVEL="3", **extra)
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def run_workers(jobs: list[tuple[list[str], Mapping[str, str]]], timeout: float) -> list[dict]:
    """Starts every `python <args>` job (args, env) at once from the repository root; returns the JSON
    object each printed on its last line, in job order (a failing job fails the test with its stderr)."""
    procs = [subprocess.Popen([sys.executable, *args], cwd=REPO, env=dict(env), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for args, env in jobs]
    reports = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, err[-4000:]
            reports.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return reports


def logged_steps(stage_dir: Path) -> list[int]:
    """Steps with a line in the stage's metrics.jsonl (complete lines only)."""
    path = stage_dir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().split("\n")[:-1]  # the text after the last newline may be half written
    return [int(line.rsplit('"step": ', 1)[1].split(",")[0]) for line in lines if '"step": ' in line]


def committed_checkpoints(stage_dir: Path) -> list[int]:
    """Steps whose checkpoint directory is committed (Orbax renames `<step>.orbax-checkpoint-tmp*`)."""
    root = stage_dir / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []


def signal_when(cmd: list[str], env: Mapping[str, str], log: Path, condition: Callable[[], bool],
                sig: int, timeout: float = 400.0) -> int:
    """Starts `cmd`, sends `sig` as soon as `condition()` holds (polled every 20 ms), returns the exit code.

    Fails if the process ends before the condition held. stdout+stderr go to `log`.
    """
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=dict(env), stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    try:
        while not condition():
            if proc.poll() is not None:
                pytest.fail(f"process exited ({proc.returncode}) before it could be signalled:\n"
                            + log.read_text()[-3000:])
            if time.monotonic() > deadline:
                pytest.fail(f"condition not reached within {timeout} s:\n" + log.read_text()[-3000:])
            time.sleep(0.02)
        os.kill(proc.pid, sig)
        return proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory) -> Path:
    """This session's persistent compilation cache (also used by this process)."""
    path = tmp_path_factory.mktemp("xla_cache")
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


@pytest.fixture(scope="session")
def base_workdir(tmp_path_factory, compile_cache) -> Path:
    """A workdir whose tokenizer and pretrain stages are finished (TINY config)."""
    workdir = tmp_path_factory.mktemp("base") / "run"
    config, dirs = tiny_config(), stage_dirs(workdir)
    mesh = distributed.make_data_mesh()
    public_stages.run_task(config, public_stages.tokenizer_task(config, mesh), dirs["tokenizer"])
    run_pretrain(config, workdir)
    return workdir


@pytest.fixture
def workdir(base_workdir, tmp_path) -> Path:
    """A private copy of `base_workdir`."""
    return Path(shutil.copytree(base_workdir, tmp_path / "run"))


@dataclasses.dataclass(frozen=True)
class Reference:
    workdir: Path  # finished; copy it before resuming in it
    summary: dict
    params: Any  # final parameters (host numpy)


@pytest.fixture(scope="session")
def dp_reference(base_workdir, tmp_path_factory) -> Reference:
    """The uninterrupted TINY DP stage, run in this process."""
    workdir = Path(shutil.copytree(base_workdir, tmp_path_factory.mktemp("reference") / "run"))
    result = run_dp(tiny_config(), workdir)
    assert result.finished and result.summary["final_step"] == TINY["dp.steps"]
    return Reference(workdir, result.summary, jax.device_get(result.state.params))


_THIS_MODULE = sys.modules[__name__]


@pytest.fixture(scope="session")
def helpers():
    """This module, for its helper functions (a test module cannot import a conftest reliably)."""
    return _THIS_MODULE
