"""Checkpoint cost for a demo-sized train state, relative to one training step.

    python -m experiments.bench.bench_checkpoint --out /tmp/bench_checkpoint.json

State: an MLP of width 1024 with about --params parameters (float32), its Adam state, an EMA copy,
a typed PRNG key and the step (about 4x the parameter bytes in all). Reference step: one jitted
non-private Adam step of that MLP on a batch of 64 (a DP step costs 2-3x that, so the ratios are an
upper bound for DP runs). Measured alternately in one process, medians over --repeats:

  async save, blocking   time until `Checkpointer.save` returns (device-to-host copy; the loop
                         continues while the write finishes in the background)
  async save, total      until the write is committed (`wait_until_finished`)
  sync save              `async_save=False`
  restore                `restore_latest` against the abstract target (resharded onto the devices)
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpwave.train.checkpoint import Checkpointer, abstract_state
from experiments.bench.common import block, median_seconds, print_table, write_json

WIDTH = 1024


def make_state(num_params: int, seed: int = 0) -> tuple[dict, optax.GradientTransformation]:
    layers = max(1, round(num_params / (WIDTH * WIDTH + WIDTH)))
    keys = jax.random.split(jax.random.key(seed), layers)
    params = {f"layer{i}": {"w": jax.random.normal(k, (WIDTH, WIDTH)) / WIDTH ** 0.5,
                            "b": jnp.zeros((WIDTH,))} for i, k in enumerate(keys)}
    opt = optax.adam(1e-3)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt.init(params),
             "ema": params, "noise_key": jax.random.key(seed + 1)}
    return state, opt


def make_train_step(opt: optax.GradientTransformation):
    def loss_fn(params, x, y):
        for layer in params.values():
            x = jnp.tanh(x @ layer["w"] + layer["b"])
        return jnp.mean((x - y) ** 2)

    @jax.jit
    def step(state, x, y):
        grads = jax.grad(loss_fn)(state["params"], x, y)
        updates, opt_state = opt.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ema = jax.tree.map(lambda e, p: 0.999 * e + 0.001 * p, state["ema"], params)
        return {**state, "step": state["step"] + 1, "params": params, "opt_state": opt_state,
                "ema": ema}

    return step


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def measure(state: dict, root: Path, repeats: int) -> tuple[dict[str, list[float]], int]:
    """Times the save/restore variants, alternating them repeat by repeat; also the disk size."""
    times: dict[str, list[float]] = {k: [] for k in
                                     ("async_blocking", "async_total", "sync", "restore")}
    target = abstract_state(state)
    with Checkpointer(root / "async", max_to_keep=2) as async_ckpt, \
            Checkpointer(root / "sync", max_to_keep=2, async_save=False) as sync_ckpt:
        for rep in range(repeats + 1):  # repeat 0 warms up (directory creation, first write)
            t0 = time.perf_counter()
            async_ckpt.save(rep, state, meta={"rep": rep}, force=True)
            t1 = time.perf_counter()
            async_ckpt.wait_until_finished()
            t2 = time.perf_counter()
            sync_ckpt.save(rep, state, meta={"rep": rep}, force=True)
            t3 = time.perf_counter()
            step, restored, _ = async_ckpt.restore_latest(target)
            block(restored)
            t4 = time.perf_counter()
            assert step == rep
            if rep:
                for key, dt in zip(times, (t1 - t0, t2 - t0, t3 - t2, t4 - t3)):
                    times[key].append(dt)
        return times, directory_bytes(root / "sync" / str(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=2_000_000, help="approximate parameter count")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="checkpoint root (default: a fresh temp dir)")
    parser.add_argument("--out", default="/tmp/bench_checkpoint.json")
    args = parser.parse_args()

    state, opt = make_state(args.params)
    train_step = make_train_step(opt)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(args.batch, WIDTH)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(args.batch, WIDTH)), jnp.float32)
    step_s = median_seconds(lambda: train_step(state, x, y), repeats=5, warmup=2)
    state = block(train_step(state, x, y))  # non-zero Adam moments: they compress less than zeros

    root = Path(args.dir or tempfile.mkdtemp(prefix="bench_ckpt_"))
    try:
        times, disk_bytes = measure(state, root, args.repeats)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)

    num_params = sum(p.size for p in jax.tree.leaves(state["params"]))
    state_bytes = sum(v.nbytes for k, v in jax.tree.leaves_with_path(state)
                      if k[0].key != "noise_key")
    labels = {"async_blocking": "async save, blocking", "async_total": "async save, total",
              "sync": "sync save", "restore": "restore (abstract target)"}
    rows = [{"operation": f"train step (Adam, batch {args.batch})", "median_s": step_s,
             "x_step": 1.0}]
    for key, label in labels.items():
        median = statistics.median(times[key])
        rows.append({"operation": label, "median_s": median, "x_step": median / step_s})
    print(f"state: {num_params / 1e6:.2f}M params, {state_bytes / 2**20:.1f} MiB in memory, "
          f"{disk_bytes / 2**20:.1f} MiB on disk; {jax.device_count()} "
          f"{jax.devices()[0].platform} device(s)")
    print_table(rows, ["operation", "median_s", "x_step"])
    write_json(args.out, "bench_checkpoint", rows, num_params=int(num_params),
               state_bytes=int(state_bytes), disk_bytes=int(disk_bytes),
               repeats=args.repeats, raw_seconds={k: times[k] for k in labels})


if __name__ == "__main__":
    main()
