"""Cluster detection, the data mesh on 4 fake devices, and two real local CPU processes."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import runs

from dpwave.train.distributed import ClusterSpec, ProcessInfo, detect_cluster, maybe_initialize_distributed

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
_SLURM = {
    "SLURM_JOB_ID": "42",
    "SLURM_NTASKS": "16",
    "SLURM_STEP_NODELIST": "gpu[01-02]",
    "SLURM_PROCID": "3",
    "SLURM_LOCALID": "3",
}


@pytest.mark.parametrize(
    "environ,expected",
    [
        ({}, None),
        ({"HOME": "/root"}, None),
        ({"DPWAVE_DISTRIBUTED": "off", **_SLURM}, None),
        ({"DPWAVE_DISTRIBUTED": "auto"}, ClusterSpec("auto")),
        (
            {
                "DPWAVE_COORDINATOR_ADDRESS": "10.0.0.1:1234",
                "DPWAVE_NUM_PROCESSES": "4",
                "DPWAVE_PROCESS_ID": "2",
                **_SLURM,
            },
            ClusterSpec("explicit", "10.0.0.1:1234", 4, 2),
        ),
        (_SLURM, ClusterSpec("slurm")),
        ({**_SLURM, "SLURM_NTASKS": "1"}, None),
        ({"TPU_WORKER_HOSTNAMES": "t-0,t-1,t-2,t-3"}, ClusterSpec("tpu")),
        ({"TPU_WORKER_HOSTNAMES": "t-0"}, None),
        ({"CLOUD_TPU_TASK_ID": "1"}, ClusterSpec("tpu")),
    ],
)
def test_detect_cluster(environ, expected):
    assert detect_cluster(environ) == expected


@pytest.mark.parametrize(
    "environ,match",
    [
        ({"DPWAVE_DISTRIBUTED": "yes"}, "DPWAVE_DISTRIBUTED"),
        ({"DPWAVE_COORDINATOR_ADDRESS": "h:1"}, "missing DPWAVE_NUM_PROCESSES, DPWAVE_PROCESS_ID"),
        (
            {"DPWAVE_COORDINATOR_ADDRESS": "nohostport", "DPWAVE_NUM_PROCESSES": "2", "DPWAVE_PROCESS_ID": "0"},
            "host:port",
        ),
        (
            {"DPWAVE_COORDINATOR_ADDRESS": "h:1", "DPWAVE_NUM_PROCESSES": "2", "DPWAVE_PROCESS_ID": "2"},
            "DPWAVE_PROCESS_ID <",
        ),
        (
            {"DPWAVE_COORDINATOR_ADDRESS": "h:1", "DPWAVE_NUM_PROCESSES": "two", "DPWAVE_PROCESS_ID": "0"},
            "not an integer",
        ),
        ({k: v for k, v in _SLURM.items() if k != "SLURM_STEP_NODELIST"}, "srun"),
    ],
)
def test_detect_cluster_rejects_bad_setups(environ, match):
    with pytest.raises(ValueError, match=match):
        detect_cluster(environ)


def test_single_process_needs_no_initialization(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("DPWAVE_", "SLURM_", "TPU_", "CLOUD_TPU", "MEGASCALE")):
            monkeypatch.delenv(name)
    assert maybe_initialize_distributed() == ProcessInfo(0, 1)
    assert maybe_initialize_distributed().is_process0


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DPWAVE_", "SLURM_"))}
    return {**env, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu", **extra}


_FOUR_DEVICES = """
import json, numpy as np, jax, jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from dpwave.train.distributed import make_data_mesh, replicate, shard_batch
mesh = make_data_mesh()
batch = shard_batch({"x": np.arange(24, dtype=np.float32).reshape(8, 3)}, mesh)
params = replicate({"w": np.ones(3, np.float32), "key": jax.random.key(0)}, mesh)
x = batch["x"]
try:
  shard_batch(np.zeros((6, 3)), mesh)
  error = None
except ValueError as e:
  error = str(e)
print(json.dumps({
    "mesh": dict(mesh.shape), "shape": list(x.shape), "spec_ok": x.sharding.spec == P("data"),
    "rows_per_device": sorted({s.data.shape[0] for s in x.addressable_shards}),
    "replicated": params["w"].sharding.is_fully_replicated and params["key"].dtype.name != "uint32",
    "sum": float(jax.jit(lambda b, w: (b * w).sum())(x, params["w"])), "error": error}))
"""


def test_data_mesh_shards_and_replicates_on_four_devices():
    result = subprocess.run(
        [sys.executable, "-c", _FOUR_DEVICES],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=4"),
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads(result.stdout.strip().splitlines()[-1])
    assert got.pop("error").startswith("a host-local batch leaf of shape (6, 3) cannot be split")
    assert got == {
        "mesh": {"data": 4},
        "shape": [8, 3],
        "spec_ok": True,
        "rows_per_device": [2],
        "replicated": True,
        "sum": float(sum(range(24))),
    }


_WORKER = """
import json, signal, sys, numpy as np, jax
from jax.sharding import PartitionSpec as P
from dpwave.train.checkpoint import Checkpointer, PreemptionGuard
from dpwave.train.distributed import (make_data_mesh, maybe_initialize_distributed, replicate,
                                      shard_batch)
info = maybe_initialize_distributed(initialization_timeout=60)
assert maybe_initialize_distributed() == info  # idempotent
mesh = make_data_mesh()
x = shard_batch(np.full((2, 3), info.index + 1, np.float32), mesh)
w = replicate({"w": np.arange(3, dtype=np.float32)}, mesh)["w"]
psum = jax.jit(jax.shard_map(lambda a, w: jax.lax.psum((a * w).sum(), "data"), mesh=mesh,
                             in_specs=(P("data"), P()), out_specs=P()))
total = psum(x, w)
before = signal.getsignal(signal.SIGTERM)
with Checkpointer(sys.argv[1]) as ckpt, PreemptionGuard(ckpt) as guard:
  handler_untouched = signal.getsignal(signal.SIGTERM) is before  # JAX's service owns SIGTERM
  stop = guard.should_stop(1)
  ckpt.save(1, {"x": x}, meta={"processes": info.count})
  step, got, meta = ckpt.restore_latest({"x": x})
print(json.dumps({"index": info.index, "count": info.count, "devices": jax.device_count(),
                  "global_shape": list(x.shape), "psum": float(total.addressable_data(0)),
                  "handler_untouched": handler_untouched, "stop": stop, "restored": [step, meta],
                  "local_rows": sorted(float(s.data[0, 0]) for s in got["x"].addressable_shards)}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_local_cpu_processes_psum_and_checkpoint(tmp_path):
    port = _free_port()
    jobs = [(["-c", _WORKER, str(tmp_path)], _env(DPWAVE_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                                  DPWAVE_NUM_PROCESSES="2", DPWAVE_PROCESS_ID=str(i),
                                                  XLA_FLAGS="--xla_force_host_platform_device_count=2"))
            for i in range(2)]
    reports = runs.run_workers(jobs, timeout=120)
    # Process i contributes two rows of (i + 1) * [0, 1, 2]: 2 * 3 * (1 + 2) = 18.
    assert reports == [
        {
            "index": i,
            "count": 2,
            "devices": 4,
            "global_shape": [4, 3],
            "psum": 18.0,
            "handler_untouched": True,
            "stop": False,
            "restored": [1, {"processes": 2}],
            "local_rows": [i + 1.0, i + 1.0],
        }
        for i in range(2)
    ]
