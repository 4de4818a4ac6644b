"""Data parallelism on simulated CPU devices: the DP update does not depend on the device count (the
noise is added once, to the global sum), and a DP checkpoint moves between device counts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import runs

pytestmark = pytest.mark.integration

TESTS = Path(__file__).resolve().parents[1]

# Runs (or resumes) the TINY DP stage with overrides argv[1] (JSON) in workdir argv[2]; saves the final
# parameters to argv[3] (.npz) and prints the device count and the summary.
_DP_STAGE = f"""
import json, sys
from pathlib import Path
sys.path.insert(0, {str(TESTS)!r})
import jax, numpy as np
from helpers import runs
result = runs.run_dp(runs.tiny_config(json.loads(sys.argv[1])), Path(sys.argv[2]))
np.savez(sys.argv[3], *map(np.asarray, jax.tree.leaves(jax.device_get(result.state.params))))
print(json.dumps({{"devices": jax.device_count(), "summary": result.summary}}))
"""


def _run_concurrently(cache: Path, jobs: list[tuple[int, list[str]]]) -> list[dict]:
    """Runs `python -c` scripts with the given simulated device counts at once; their last JSON lines."""
    return runs.run_workers([(["-c", *args], runs.subprocess_env(cache, devices)) for devices, args in jobs],
                               timeout=400)


@pytest.mark.slow  # three processes, two of them compiling the DP step for a new device count
def test_dp_checkpoint_saved_on_4_devices_resumes_on_2_and_1(base_workdir, compile_cache, dp_reference,
                                                            tmp_path):
    first = Path(shutil.copytree(base_workdir, tmp_path / "four"))
    [saved] = _run_concurrently(compile_cache,
                                [(4, [_DP_STAGE, json.dumps({"dp.mechanism.steps": 4}), str(first),
                                      str(tmp_path / "4.npz")])])
    assert (saved["devices"], saved["summary"]["steps"]) == (4, 4)
    jobs, dirs = [], {}
    for devices in (2, 1):
        dirs[devices] = Path(shutil.copytree(first, tmp_path / f"resumed{devices}"))
        jobs.append((devices, [_DP_STAGE, "{}", str(dirs[devices]), str(tmp_path / f"{devices}.npz")]))
    want = dp_reference.summary
    for (devices, _), report in zip(jobs, _run_concurrently(compile_cache, jobs)):
        got = report["summary"]
        assert report["devices"] == devices
        assert (got["final_step"], got["steps"]) == (10, 10)
        # The ledger continued from the 4-device checkpoint's 4 steps: the same events and epsilon as
        # the uninterrupted 1-process run.
        assert got["ledger"] == want["ledger"] and got["epsilon"] == want["epsilon"]
        assert runs.logged_steps(dirs[devices] / "dp_finetune")[4] == 5  # resumed at step 4, not 0
        # Same Poisson draws and noise; only the summation order of the clipped gradients differs.
        with np.load(tmp_path / f"{devices}.npz") as params:
            for i, ref in enumerate(jax.tree.leaves(dp_reference.params)):
                np.testing.assert_allclose(params[f"arr_{i}"], ref, rtol=0, atol=2e-4)


# One DP-SGD step (lr 1: the update is minus the privatized gradient) of a dense layer with per-example
# dropout, on meshes of 1, 2 and 4 of the 4 simulated devices, with and without noise; plus the clipped
# sum computed independently from `jax.vmap(jax.grad(...))` and numpy.
_UPDATES = """
import json
import numpy as np, jax, jax.numpy as jnp, optax
from flax import nnx
from dpwave import privacy
from dpwave.privacy.keys import example_keys
from dpwave.train import distributed, steps

D, B, REAL, EXPECTED, SIGMA = 64, 16, 13, 16.0, 100.0

class Dense(nnx.Module):
  def __init__(self, rngs):
    self.layer = nnx.Linear(D, D, rngs=rngs)
  def __call__(self, x):
    return self.layer(x)

graphdef, params = nnx.split(Dense(nnx.Rngs(0)), nnx.Param)
rng = np.random.default_rng(0)
batch = {"x": rng.normal(size=(B, D)).astype(np.float32), "y": 3 * rng.normal(size=(B, D)).astype(np.float32)}
mask = np.arange(B) < REAL
key = jax.random.key(5)

def example_loss(p, example, k):
  keep = jax.random.bernoulli(k, 0.8, example["x"].shape)
  pred = nnx.merge(graphdef, p)(jnp.where(keep, example["x"], 0.0) / 0.8)
  return 0.5 * jnp.sum((pred - example["y"]) ** 2)

flat = lambda tree: np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(jax.device_get(tree))])
# Step 0's key is fold_in(key, 0); each example's key is a keyed hash of its content under it (dpwave.privacy.keys).
keys = example_keys(jax.random.fold_in(key, 0), batch)
grads = jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0))(params, batch, keys)
per_example = np.stack([flat(jax.tree.map(lambda g: g[i], grads)) for i in range(B)])
norms = np.linalg.norm(per_example.astype(np.float64), axis=1)
CLIP = float(np.median(norms[mask]))  # about half the real examples get clipped
clipped_sum = (per_example * (mask * np.minimum(1.0, CLIP / norms))[:, None]).sum(0)
expected = -clipped_sum / EXPECTED

def update(devices, sigma):
  mesh = distributed.make_data_mesh(jax.devices()[:devices])
  opt = privacy.dp_optimizer(optax.sgd(1.0), l2_clip=CLIP, noise_multiplier=sigma, expected_batch_size=EXPECTED, key=3)
  state = distributed.replicate(steps.TrainState(jax.tree.map(jnp.copy, params), opt.init(params)), mesh)
  step = steps.dp_step(privacy.clipped_grad(example_loss, l2_clip=CLIP, microbatch_size=2), opt, mesh)
  new, metrics = step(state, distributed.shard_batch(batch, mesh), distributed.shard_batch(mask, mesh), key, 0)
  assert int(metrics["batch_size"]) == REAL
  return flat(new.params) - flat(params)

plain = {d: update(d, 0.0) for d in (1, 2, 4)}
noisy = {d: update(d, SIGMA) for d in (1, 2, 4)}
noise_scale = SIGMA * CLIP / EXPECTED
z = {d: (noisy[d] - plain[d]) / noise_scale for d in noisy}
print(json.dumps({
    "clipped_examples": int(((norms > CLIP * (1 + 1e-6)) & mask).sum()),
    "plain_vs_numpy": {d: float(np.abs(u - expected).max()) for d, u in plain.items()},
    "plain_scale": float(np.abs(expected).max()),
    "noisy_vs_1_device": {d: float(np.abs(u - noisy[1]).max() / noise_scale) for d, u in noisy.items()},
    "noise_std": {d: float(v.std()) for d, v in z.items()}, "noise_mean": {d: float(v.mean()) for d, v in z.items()},
    "size": int(z[1].size)}))
"""


def test_dp_update_is_the_same_on_1_2_4_devices_and_the_noise_is_added_once(compile_cache):
    [got] = _run_concurrently(compile_cache, [(4, [_UPDATES])])
    assert 4 <= got["clipped_examples"] <= 9  # some real examples are clipped, some not
    for devices in ("1", "2", "4"):
        assert got["plain_vs_numpy"][devices] <= 1e-6 * max(1.0, got["plain_scale"]), got
        # The same noise sample whatever the device count: noise drawn per device would differ here.
        assert got["noisy_vs_1_device"][devices] <= 1e-5, got
        # std of the update's noise is sigma * C / (qN), not sqrt(devices) times it (4160 coordinates:
        # the estimate's own std is ~1.1%).
        assert abs(got["noise_std"][devices] - 1.0) < 0.05, got
        assert abs(got["noise_mean"][devices]) < 0.06, got
    assert got["size"] == 64 * 64 + 64
