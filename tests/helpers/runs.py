"""Tiny runs for the framework tests (resume, parallelism, multi-host, CLI): configs, stage runners, subprocesses.

* `TINY`: overrides of `experiments/configs/mnist.py:tiny` that make a DP stage take seconds: 400
  private digits, expected batch 16, an explicit noise multiplier (no calibration, and `dp.mechanism.steps` can
  change without changing the mechanism), a fixed `dp.secret.seed` (bit-exact reruns), a checkpoint
  every 2 steps and a metrics line every step (progress a test can watch from outside a process).
* `run_workers`, `signal_when`: concurrent JAX worker processes, and a process signalled mid-run.
* `run_cli`, `message_lines`: several `python -m dpwave.main` commands at once, and what a user reads on stderr.

The session fixtures built from these (compilation cache, base workdir, DP reference) are in tests/train/conftest.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import ml_collections
import pytest
import tensorflow_datasets as tfds

from dpwave import data
from dpwave.train import distributed, loop, pipeline, settings
from dpwave.train.stages.base import Context
from dpwave.train.stages.dp_finetune import STAGE as DP_FINETUNE
from dpwave.train.stages.dp_finetune import DpRun
from dpwave.train.stages.pretrain import STAGE as PRETRAIN
from dpwave.train.stages.tokenizer import STAGE as TOKENIZER
from experiments.configs import mnist

REPO = Path(__file__).resolve().parents[2]
TINY: dict[str, Any] = {
    "tokenizer.steps": 2, "pretrain.steps": 2, "data.private.split": "private[:400]",
    "dp.mechanism.expected_batch_size": 16, "perf.microbatch_size": 8, "dp.mechanism.steps": 10,
    "dp.mechanism.noise_multiplier": 1.0, "dp.secret.seed": 7, "checkpoint.every_steps": 2,
    "checkpoint.max_to_keep": 2, "log_every_steps": 1,
}


def tiny_config(overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """`mnist.py:tiny` with `TINY` and then `overrides` ({"dp.mechanism.steps": 4, ...}) applied, locked."""
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


def context(config: ml_collections.ConfigDict, workdir: Path) -> Context:
    """What the pipeline gives a stage of `config`'s run in `workdir`."""
    run = settings.read(config)
    return Context(run, str(workdir), distributed.make_data_mesh(), pipeline.stage_inputs(run))


def dp_stage(config: ml_collections.ConfigDict, workdir: Path) -> DpRun:
    """The DP stage of `workdir` (finished tokenizer and pretrain), built but not run."""
    ctx = context(config, workdir)
    return DpRun(ctx.settings, ctx.mesh, stage_dir=ctx.dir("dp_finetune"), tokenizer_dir=ctx.dir("tokenizer"),
                 pretrain_dir=ctx.dir("pretrain"))


def run_dp(config: ml_collections.ConfigDict, workdir: Path) -> loop.LoopResult:
    """Runs (or resumes) the DP stage of `workdir` in this process, as the pipeline does."""
    ctx = context(config, workdir)
    return DP_FINETUNE.train(ctx)


def run_tokenizer(config: ml_collections.ConfigDict, workdir: Path) -> loop.LoopResult:
    ctx = context(config, workdir)
    return TOKENIZER.train(ctx)


def run_pretrain(config: ml_collections.ConfigDict, workdir: Path) -> loop.LoopResult:
    ctx = context(config, workdir)
    return PRETRAIN.train(ctx)


def run_stage(config: ml_collections.ConfigDict, workdir: Path, name: str) -> loop.LoopResult:
    """Runs (or resumes) training stage `name` of `workdir` in this process, as the pipeline does."""
    ctx = context(config, workdir)
    stage = next(s for s in pipeline.stages(ctx.settings) if s.name == name)
    return stage.train(ctx)


def forbid_private_reads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    """Fails the test when a private split is opened outside the run-start content check (the public-only
    control's one read of it); returns the list of (split, inside the check) every opened source appends to."""
    opened, hashing = [], []
    source_init = data.Source.__init__
    as_data_source = tfds.core.DatasetBuilder.as_data_source
    check_boundary = settings.DataSettings.check_boundary

    def boundary(self):  # the run-start content check: the one place the private split may be opened
        hashing.append(True)
        try:
            return check_boundary(self)
        finally:
            hashing.pop()

    def checked_source(self, source, spec, *args, **kw):
        opened.append((spec.split, bool(hashing)))
        assert spec.privacy != "private" or hashing, f"the public-only control opened {spec.label} outside the check"
        source_init(self, source, spec, *args, **kw)

    def checked_split(self, split, *args, **kw):
        assert "private" not in str(split) or hashing, f"the public-only control read split {split} outside the check"
        return as_data_source(self, split, *args, **kw)

    monkeypatch.setattr(settings.DataSettings, "check_boundary", boundary)
    monkeypatch.setattr(data.Source, "__init__", checked_source)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "as_data_source", checked_split)
    return opened


def subprocess_env(cache_dir: Path, devices: int | None = None, **extra: str) -> dict[str, str]:
    """Environment of a child JAX process: repo on the path, CPU, the shared compilation cache, this process's XLA
    flags but its own device count (a child compared bit for bit with this process must round alike: CI runs the
    suite once under --xla_cpu_max_isa)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DPWAVE_", "SLURM_", "XLA_FLAGS"))}
    env.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", TF_CPP_MIN_LOG_LEVEL="3", **extra)
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    if devices is not None:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
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


def run_cli(commands: Mapping[str, list[str]], cache_dir: Path, timeout: float = 300) -> dict[str, tuple[int, str]]:
    """Runs `python -m dpwave.main <args>` for every named command at once; (exit code, stderr) of each."""
    procs = {name: subprocess.Popen([sys.executable, "-m", "dpwave.main", *args], cwd=REPO,
                                    env=subprocess_env(cache_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True) for name, args in commands.items()}
    try:
        errors = {name: proc.communicate(timeout=timeout)[1] for name, proc in procs.items()}
        return {name: (proc.returncode, errors[name]) for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()


_NOT_A_MESSAGE = re.compile(r"\[\d\d:\d\d|\d+%\|")  # a tqdm bar: elapsed time in brackets, or a percentage bar
_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def message_lines(stderr: str) -> list[str]:
    """The lines of `stderr` a user reads as messages: without blank lines and progress bars (tqdm redraws with
    carriage returns and cursor moves, e.g. TFDS building an image folder)."""
    lines = (_ESCAPE.sub("", line) for line in re.split(r"[\r\n]", stderr))
    return [line for line in lines if line.strip() and not _NOT_A_MESSAGE.search(line)]


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


@dataclasses.dataclass(frozen=True)
class Reference:
    workdir: Path  # finished; copy it before resuming in it
    summary: dict
    params: Any  # final parameters (host numpy)


# Sizes that run the baseline methods' stages in seconds (tiny_config's sizes otherwise).
BASELINE_SMALL = {"merf.num_features": 200, "merf.steps": 4, "merf.batch_size": 20, "refiner.steps": 2,
                  "diffusion.steps": 2, "dp.mechanism.steps": 3, "sample.num_samples": 20, "sample.batch_size": 10,
                  "eval.feature_epochs": 1, "eval.downstream_epochs": 1, "eval.num_real": 50}


def baseline_config(method: str, **overrides: Any) -> ml_collections.ConfigDict:
    """`tiny_config` of a baseline method (dp_merf, dpwave_merf, dp_diffusion) at `BASELINE_SMALL` sizes."""
    return tiny_config({"method": method, **BASELINE_SMALL, **overrides})


def stage_names(config: ml_collections.ConfigDict) -> list[str]:
    """The stages `config` runs, in order."""
    return [stage.name for stage in pipeline.stages(settings.read(config))]
