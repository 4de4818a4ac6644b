"""Two local CPU processes (jax.distributed over 127.0.0.1) take the same DP steps as one process."""

from __future__ import annotations

import socket

import numpy as np
import pytest
from helpers import runs

pytestmark = pytest.mark.integration

# Three DP-Adam steps of `steps.dp_step` on a dense layer with per-example dropout, fed the way the DP
# stage feeds it: every process draws the same Poisson batch (pure function of (seed, step)), takes its
# contiguous share (`local_slice`) and builds the global arrays with `shard_batch`.
_WORKER = """
import json
import numpy as np, jax, jax.numpy as jnp, optax
from flax import nnx
from dpwave import data, privacy
from dpwave.train import distributed, hashing, steps
from dpwave.train.distributed import local_slice

info = distributed.maybe_initialize_distributed(initialization_timeout=120)
mesh = distributed.make_data_mesh()
N, D = 64, 8

class Dense(nnx.Module):
  def __init__(self, rngs):
    self.layer = nnx.Linear(D, D, rngs=rngs)
  def __call__(self, x):
    return self.layer(x)

graphdef, params = nnx.split(Dense(nnx.Rngs(0)), nnx.Param)
rng = np.random.default_rng(0)
examples = {"x": rng.normal(size=(N, D)).astype(np.float32), "y": rng.normal(size=(N, D)).astype(np.float32)}

def example_loss(p, example, key):
  keep = jax.random.bernoulli(key, 0.8, example["x"].shape)
  pred = nnx.merge(graphdef, p)(jnp.where(keep, example["x"], 0.0) / 0.8)
  return 0.5 * jnp.sum((pred - example["y"]) ** 2)

sampler = privacy.PoissonSampler(N, 0.25, seed=11, bucket_multiple=4)
opt = privacy.dp_optimizer(optax.adam(0.05), l2_clip=1.0, noise_multiplier=1.0,
                           expected_batch_size=sampler.selection.expected_batch_size, key=3)
step = steps.dp_step(privacy.clipped_grad(example_loss, l2_clip=1.0), opt, mesh)
state = distributed.replicate(steps.TrainState(jax.tree.map(jnp.copy, params), opt.init(params)), mesh)
sizes = []
for i in range(3):
  indices, mask = sampler.batch(i)
  batch = distributed.shard_batch({k: v[local_slice(indices)] for k, v in examples.items()}, mesh)
  state, metrics = step(state, batch, distributed.shard_batch(local_slice(mask), mesh),
                        jax.random.key(9), i)
  sizes.append([int(mask.sum()), int(np.asarray(metrics["batch_size"].addressable_data(0)))])
host = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), state.params)
print(json.dumps({"process": info.index, "processes": info.count, "devices": jax.device_count(),
                  "sizes": sizes, "sha256": hashing.params_sha256(host),
                  "params": [x.ravel().tolist() for x in jax.tree.leaves(host)]}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_agree_with_each_other_and_with_one_process(compile_cache):
    address = f"127.0.0.1:{_free_port()}"
    envs = [runs.subprocess_env(compile_cache, 2, DPWAVE_COORDINATOR_ADDRESS=address, DPWAVE_NUM_PROCESSES="2",
                                   DPWAVE_PROCESS_ID=str(i)) for i in range(2)]
    envs.append(runs.subprocess_env(compile_cache, 1))  # the single-process, single-device run
    reports = runs.run_workers([(["-c", _WORKER], env) for env in envs], timeout=300)
    first, second, single = reports
    assert [(r["process"], r["processes"], r["devices"]) for r in reports] == [(0, 2, 4), (1, 2, 4), (0, 1, 1)]
    # Every step saw the whole Poisson batch (both processes' shares), and the batches were not empty.
    for report in reports:
        assert all(drawn == seen > 0 for drawn, seen in report["sizes"]), report["sizes"]
    assert first["sizes"] == single["sizes"]
    # The processes hold bit-identical replicas; the single process computes the same steps.
    assert first["sha256"] == second["sha256"]
    for a, b in zip(first["params"], single["params"]):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
