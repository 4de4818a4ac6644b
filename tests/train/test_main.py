"""`python -m dpwave.main`: bad command lines end with a clean message, a non-zero exit and no work done."""

from __future__ import annotations

import subprocess
import sys

import pytest

_CONFIG = "--config=experiments/configs/mnist.py:tiny"
_CASES = {
    "typo": ([_CONFIG, "--config.dp.sepsilon=1"], ["--config.dp.sepsilon", "no such config field"]),
    "no_workdir": ([_CONFIG], ["--workdir", "must have a value"]),
    "bad_value": ([_CONFIG, "--config.dp.steps=ten"], ["--config.dp.steps", "ten"]),
    "no_config": ([], ["--config", "must have a value"]),
    "bad_seed_file": ([_CONFIG, "--config.dp.secret_seed_file=/nonexistent/dp_seed"],
                      ["dp.secret_seed_file '/nonexistent/dp_seed' does not exist", "umask 077"]),
}


@pytest.fixture(scope="module")
def outcomes(helpers, compile_cache, tmp_path_factory) -> dict[str, tuple[int, str, bool]]:
    """(exit code, stderr, whether the workdir was created) of each case, run concurrently."""
    root = tmp_path_factory.mktemp("cli")
    procs = {}
    for name, (args, _) in _CASES.items():
        workdir = [f"--workdir={root / name}"] if name != "no_workdir" else []
        procs[name] = subprocess.Popen([sys.executable, "-m", "dpwave.main", *args, *workdir], cwd=helpers.REPO,
                                       env=helpers.subprocess_env(compile_cache), stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
    try:
        errors = {name: proc.communicate(timeout=180)[1] for name, proc in procs.items()}
        return {name: (proc.returncode, errors[name], (root / name).exists()) for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()


@pytest.mark.parametrize("case", sorted(_CASES))
def test_bad_command_line_gives_a_clean_error(outcomes, case):
    code, stderr, created = outcomes[case]
    assert code != 0, stderr
    assert "Traceback" not in stderr, stderr
    for fragment in _CASES[case][1]:
        assert fragment in stderr, stderr
    assert not created  # failed before touching the workdir


def test_a_bad_secret_seed_file_is_one_line(outcomes):
    stderr = outcomes["bad_seed_file"][1]
    assert stderr.strip().splitlines()[-1].startswith("dpwave.main: dp.secret_seed_file '/nonexistent/dp_seed' does "
                                                      "not exist; create it with (umask 077;")
