"""Session fixtures of the framework tests (helpers in tests/helpers/runs.py).

* A persistent XLA compilation cache per worker, shared with the worker's subprocesses: each process still traces,
  lowers and runs everything itself; it only skips recompiling identical programs. Not shared between the xdist
  workers: JAX writes cache entries in place, and a worker reading an entry the other is writing would recompile
  with a warning on stderr, which the one-line CLI tests read.
* `base_workdir`: tokenizer + AR pretraining run ONCE per session (by the first worker that needs it, the others
  wait for it); tests copy it.
* `dp_reference`: the uninterrupted DP stage on that base, the ground truth of the resume tests.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

import jax
import pytest
from helpers.runs import TINY, Reference, run_dp, run_pretrain, run_tokenizer, tiny_config


def _shared(tmp_path_factory, name: str) -> Path:
    """A directory of this session shared by its xdist workers (their base temp directories' parent), or this
    process's own without xdist."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        path = tmp_path_factory.getbasetemp().parent / name
        path.mkdir(exist_ok=True)
        return path
    return tmp_path_factory.mktemp(name)


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
    root = _shared(tmp_path_factory, "base")
    workdir, done = root / "run", root / "done"
    with open(root / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when its process dies
        if not done.exists():
            shutil.rmtree(workdir, ignore_errors=True)  # what a worker that failed midway left
            run_tokenizer(tiny_config(), workdir)
            run_pretrain(tiny_config(), workdir)
            done.touch()
    return workdir


@pytest.fixture
def workdir(base_workdir, tmp_path) -> Path:
    """A private copy of `base_workdir`."""
    return Path(shutil.copytree(base_workdir, tmp_path / "run"))


@pytest.fixture(scope="session")
def dp_reference(base_workdir, tmp_path_factory) -> Reference:
    """The uninterrupted TINY DP stage, run in this process."""
    workdir = Path(shutil.copytree(base_workdir, tmp_path_factory.mktemp("reference") / "run"))
    result = run_dp(tiny_config(), workdir)
    assert result.finished and result.summary["final_step"] == TINY["dp.mechanism.steps"]
    return Reference(workdir, result.summary, jax.device_get(result.state.params))
