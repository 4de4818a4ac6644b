"""Checkpoint facade: round trips, fallback on damage, retention, preemption, resharding; hashes."""

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpwave.train.checkpoint import (
    CheckpointRestoreError,
    Checkpointer,
    PreemptionGuard,
    abstract_state,
)

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _train_state(seed: int, key_impl: str = "threefry2x32") -> dict:
    """A small train state: int step, params, DP-Adam-like optax state with a typed key, EMA."""
    rng = np.random.default_rng(seed)
    params = {
        "w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(3,)), jnp.float32),
    }
    opt = optax.adam(1e-2)
    opt_state = opt.init(params)
    _, opt_state = opt.update(jax.tree.map(jnp.ones_like, params), opt_state, params)
    return {
        "step": jnp.asarray(seed, jnp.int32),
        "params": params,
        "opt_state": opt_state,
        "noise_key": jax.random.key(seed, impl=key_impl),
        "ema": jax.tree.map(lambda x: 0.5 * x, params),
    }


def _assert_same_state(restored: dict, expected: dict) -> None:
    assert jax.tree.structure(restored) == jax.tree.structure(expected)
    assert type(restored["opt_state"][0]) is optax.ScaleByAdamState
    assert restored["noise_key"].dtype == expected["noise_key"].dtype
    np.testing.assert_array_equal(
        jax.random.key_data(restored["noise_key"]), jax.random.key_data(expected["noise_key"])
    )
    plain = lambda s: {k: v for k, v in s.items() if k != "noise_key"}
    for got, want in zip(jax.tree.leaves(plain(restored)), jax.tree.leaves(plain(expected))):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("key_impl", ["threefry2x32", "rbg"])
def test_round_trip_preserves_types_keys_and_meta(tmp_path, key_impl):
    state = _train_state(7, key_impl)
    meta = {
        "stage": "dp_finetune",
        "ledger": [{"sigma": 1.1, "q": 0.01, "steps": 7}],
        "sampler": {"seed": 3, "step": 7},
        "target_epsilon": float("inf"),
    }
    with Checkpointer(tmp_path) as ckpt:
        assert ckpt.save(7, state, meta=meta)
    with Checkpointer(tmp_path) as ckpt:
        step, restored, restored_meta = ckpt.restore_latest(abstract_state(_train_state(0, key_impl)))
    assert step == 7 and restored_meta == meta
    _assert_same_state(restored, state)
    np.testing.assert_array_equal(
        jax.random.normal(restored["noise_key"], (4,)), jax.random.normal(state["noise_key"], (4,))
    )


def test_restore_against_eval_shape_target(tmp_path):
    state = _train_state(3)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(3, state, meta={})
        _, restored, _ = ckpt.restore_latest(jax.eval_shape(lambda: _train_state(0)))
    _assert_same_state(restored, state)
    assert isinstance(restored["params"]["w"], jax.Array)


def test_empty_directory_restores_none(tmp_path):
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        assert ckpt.restore_latest(_train_state(0)) is None


def _damage(step_dir: Path, how: str) -> None:
    if how == "truncate_data":
        files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "d" in p.parent.parts]
        assert files
        for p in files:
            with open(p, "r+b") as f:
                f.truncate(3)
    elif how == "delete_state_metadata":
        (step_dir / "state" / "_METADATA").unlink()
    elif how == "delete_meta":
        (step_dir / "meta" / "metadata").unlink()


@pytest.mark.parametrize("how", ["truncate_data", "delete_state_metadata", "delete_meta"])
def test_damaged_newest_falls_back_to_previous(tmp_path, caplog, how):
    with Checkpointer(tmp_path) as ckpt:
        for step in (1, 2, 3):
            ckpt.save(step, _train_state(step), meta={"step": step})
    _damage(tmp_path / "3", how)
    with caplog.at_level(logging.WARNING), Checkpointer(tmp_path) as ckpt:
        step, restored, meta = ckpt.restore_latest(abstract_state(_train_state(0)))
    assert step == 2 and meta == {"step": 2}
    _assert_same_state(restored, _train_state(2))
    assert any("step 3" in r.getMessage() and "could not be restored" in r.getMessage() for r in caplog.records)


def test_all_damaged_raises_instead_of_restarting(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        for step in (1, 2):
            ckpt.save(step, _train_state(step), meta={})
    for step in (1, 2):
        _damage(tmp_path / str(step), "delete_state_metadata")
    with Checkpointer(tmp_path) as ckpt, pytest.raises(CheckpointRestoreError, match=r"\[2, 1\]"):
        ckpt.restore_latest(_train_state(0))


def test_incompatible_target_raises(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, {"w": jnp.ones((4,))}, meta={})
        with pytest.raises(CheckpointRestoreError, match="could be restored"):
            ckpt.restore_latest({"w": jnp.ones((5,))})


def test_keeps_last_k_plus_final_across_reopen(tmp_path):
    tiny = lambda s: {"x": jnp.full((2,), s, jnp.float32)}
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        for step in range(1, 4):
            ckpt.save(step, tiny(step), meta={}, final=step == 3)
        for step in range(4, 7):
            ckpt.save(step, tiny(step), meta={})
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [3, 5, 6]
    with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
        assert ckpt.final_steps == {3}
        for step in (7, 8):
            ckpt.save(step, tiny(step), meta={})
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [3, 7, 8]
        state, _ = ckpt.restore(3, tiny(0))
        np.testing.assert_array_equal(state["x"], [3.0, 3.0])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name[0].isdigit()) == ["3", "7", "8"]


def test_final_save_of_existing_step_only_marks_it(tmp_path):
    with Checkpointer(tmp_path, max_to_keep=1) as ckpt:
        assert ckpt.save(1, {"x": jnp.zeros(2)}, meta={})
        assert not ckpt.save(1, {"x": jnp.ones(2)}, meta={}, final=True)
        ckpt.save(2, {"x": jnp.ones(2)}, meta={})
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [1, 2]
        np.testing.assert_array_equal(ckpt.restore(1, {"x": jnp.ones(2)})[0]["x"], [0.0, 0.0])


def test_keep_final_false_collects_final(tmp_path):
    with Checkpointer(tmp_path, max_to_keep=1, keep_final=False) as ckpt:
        ckpt.save(1, {"x": jnp.zeros(2)}, meta={}, final=True)
        ckpt.save(2, {"x": jnp.zeros(2)}, meta={})
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [2]


def test_save_interval_and_force(tmp_path):
    with Checkpointer(tmp_path, save_interval_steps=5) as ckpt:
        assert not ckpt.should_save(3)
        assert not ckpt.save(3, {"x": jnp.zeros(2)}, meta={})
        assert ckpt.save(5, {"x": jnp.zeros(2)}, meta={})
        assert ckpt.save(7, {"x": jnp.zeros(2)}, meta={}, force=True)
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [5, 7]


def test_saves_are_atomic_and_stale_tmp_dirs_are_ignored_and_removed(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, {"x": jnp.ones(3)}, meta={"a": 1})
    stale = tmp_path / "2.orbax-checkpoint-tmp"  # what a crash in the middle of a save leaves
    (stale / "state").mkdir(parents=True)
    (stale / "state" / "garbage").write_bytes(b"\x00" * 10)
    with Checkpointer(tmp_path) as ckpt:
        step, _, meta = ckpt.restore_latest({"x": jnp.zeros(3)})
        assert (step, meta) == (1, {"a": 1})
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["1"]


@pytest.mark.parametrize(
    "kwargs,match", [({"max_to_keep": 0}, "max_to_keep"), ({"save_interval_steps": 0}, "save_interval_steps")]
)
def test_bad_options_are_rejected(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Checkpointer(tmp_path, **kwargs)


def test_bad_save_arguments_are_rejected(tmp_path):
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(ValueError, match="JSON"):
            ckpt.save(1, {"x": jnp.zeros(2)}, meta={"ledger": np.zeros(3)})
        with pytest.raises(ValueError, match="non-negative int"):
            ckpt.save(-1, {"x": jnp.zeros(2)}, meta={})
        assert ckpt.all_steps() == []


def test_damaged_final_steps_file_is_reported(tmp_path):
    (tmp_path / "final_steps.json").write_text("{not json")
    with pytest.raises(ValueError, match="final_steps.json"):
        Checkpointer(tmp_path)


def test_preemption_guard_flags_sigterm_and_restores_handler(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with Checkpointer(tmp_path) as ckpt, PreemptionGuard(ckpt) as guard:
        assert not guard.should_stop(0)  # single process: Orbax's sync point is never reached
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested and guard.should_stop(1)
    assert signal.getsignal(signal.SIGTERM) is before


_LOOP = """
import sys, time, jax.numpy as jnp
from dpwave.train.checkpoint import Checkpointer, PreemptionGuard
with Checkpointer(sys.argv[1], save_interval_steps=1000) as ckpt, PreemptionGuard(ckpt) as guard:
  state = {"count": jnp.zeros((), jnp.int32)}
  for step in range(1, 100000):
    state = {"count": state["count"] + 1}
    print("step", step, flush=True)
    if guard.should_stop(step):
      ckpt.save(step, state, meta={"reason": "sigterm"}, force=True)
      print("saved", step, flush=True)
      break
    time.sleep(0.02)
"""


def test_sigterm_saves_at_next_step_boundary_and_exits_zero(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _LOOP, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        for line in proc.stdout:
            if line.startswith("step 3"):
                proc.send_signal(signal.SIGTERM)
                break
        out = proc.stdout.read()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    saved = int(out.split("saved ")[1].split()[0])
    assert saved >= 3 and f"step {saved + 1}" not in out
    with Checkpointer(tmp_path) as ckpt:
        step, state, meta = ckpt.restore_latest({"count": jnp.zeros((), jnp.int32)})
    assert (step, int(state["count"]), meta) == (saved, saved, {"reason": "sigterm"})


_SHARDED = """
import json, sys
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import NamedSharding, PartitionSpec as P
from dpwave.train.checkpoint import Checkpointer
mode, directory = sys.argv[1], sys.argv[2]
mesh = jax.make_mesh((jax.device_count(),), ("data",))
def state(scale):
  params = {"w": jax.device_put(scale * jnp.arange(32.0).reshape(8, 4), NamedSharding(mesh, P("data"))),
            "b": jax.device_put(scale * jnp.arange(4.0), NamedSharding(mesh, P()))}
  opt_state = optax.adam(0.1).init(params)
  _, opt_state = optax.adam(0.1).update(params, opt_state, params)
  return {"params": params, "opt": opt_state, "key": jax.random.key(5)}
with Checkpointer(directory) as ckpt:
  if mode == "save":
    ckpt.save(4, state(1.0), meta={"devices": jax.device_count()})
    print(json.dumps({"devices": jax.device_count()}))
  else:
    step, got, meta = ckpt.restore_latest(state(0.0))
    want = jax.device_get(state(1.0))
    w = got["params"]["w"]
    print(json.dumps({
        "devices": jax.device_count(), "step": step, "meta": meta,
        "equal": all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
                     zip(jax.tree.leaves(got["params"]) + jax.tree.leaves(got["opt"]),
                         jax.tree.leaves(want["params"]) + jax.tree.leaves(want["opt"]))),
        "adam_type": type(got["opt"][0]).__name__,
        "w_devices": len(w.sharding.device_set), "w_split": w.sharding.spec == P("data"),
        "mu_devices": len(got["opt"][0].mu["w"].sharding.device_set),
        "key_dtype": str(got["key"].dtype)}))
"""


def _sharded_workers(mode: str, directory: Path, device_counts: tuple[int, ...]) -> list[dict]:
    """Runs one `_SHARDED` process per device count, concurrently; returns their JSON reports."""
    procs = []
    for devices in device_counts:
        env = {
            **os.environ,
            "PYTHONPATH": str(REPO),
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _SHARDED, mode, str(directory)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
        )
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        reports.append(json.loads(out.strip().splitlines()[-1]))
    return reports


def test_state_saved_on_4_devices_restores_on_2_and_1(tmp_path):
    assert _sharded_workers("save", tmp_path, (4,)) == [{"devices": 4}]
    for devices, got in zip((2, 1), _sharded_workers("restore", tmp_path, (2, 1))):
        assert got == {
            "devices": devices,
            "step": 4,
            "meta": {"devices": 4},
            "equal": True,
            "adam_type": "ScaleByAdamState",
            "w_devices": devices,
            "w_split": True,
            "mu_devices": devices,
            "key_dtype": "key<fry>",
        }


