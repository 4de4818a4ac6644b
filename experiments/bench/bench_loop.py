"""The stage loop's cost on a DP stage: `loop.run` vs the raw jitted `dp_step`, in one process.

    python -m experiments.bench.bench_loop --out /tmp/bench_loop.json [--steps 40 --every 10 --repeats 3]

Stage: `mnist.py:tiny`'s DP finetuning (2,000 private digits, expected batch 64, microbatch 8, noise
calibrated to epsilon 10 over 2N steps, budget guard on). Its tokenizer (2 steps) and AR model (0
steps: the initialization) are barely trained: their quality does not change the cost of a step.

Each variant runs N and 2N steps; the per-step cost is the difference / N, so what a stage pays once
(restore attempt, writers, the budget search, the final checkpoint, epsilon and parameter hash) drops
out and is reported as `fixed_s`. Timed alternately, medians over --repeats, after one warm-up:

  raw dp_step                  the jitted `dp_step` over pre-drawn, pre-sharded batches and keys
  loop, epsilon every L        `loop.run`: sampler, gather and transfer, ledger, budget guard,
                               epsilon at log steps, metrics, progress, preemption check
  loop, epsilon only at end    the same with no log step before the last (isolates the accountant)
  ... ckpt every k             the first loop, plus a checkpoint every --every steps

Derived: the loop's rate as a fraction of raw (goal >= 90%), the checkpoint overhead (goal < 5%) and
the per-step cost of logging epsilon. A second table times each piece of per-step host work in
isolation (microseconds per call).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax

from dpwave import privacy
from dpwave.train import distributed, loop, public_stages
from dpwave.train.checkpoint import Checkpointer
from dpwave.train.dp_stage import DpFinetune
from dpwave.train.metrics import MetricWriter
from experiments.bench.common import block, print_table, write_json
from experiments.configs import mnist


def make_stage(workdir: Path, steps: int, log_every: int) -> DpFinetune:
    config = mnist.get_config("tiny")
    with config.unlocked():
        config.tokenizer.steps, config.pretrain.steps = 2, 0  # its schedule needs >= 2 steps
        config.dp.steps = steps
        config.dp.secret_seed = 0
        config.log_every_steps = log_every
    mesh = distributed.make_data_mesh()
    dirs = {name: str(workdir / name) for name in ("tokenizer", "pretrain", "dp_finetune")}
    public_stages.run_task(config, public_stages.tokenizer_task(config, mesh), dirs["tokenizer"])
    public_stages.run_task(config, public_stages.pretrain_task(config, mesh, dirs["tokenizer"]), dirs["pretrain"])
    return DpFinetune(config, mesh, stage_dir=dirs["dp_finetune"], tokenizer_dir=dirs["tokenizer"],
                      pretrain_dir=dirs["pretrain"])


def pre_drawn(stage: DpFinetune, steps: int) -> list[tuple[Any, Any, jax.Array]]:
    """What `DpFinetune.step` feeds `dp_step`, computed ahead and resident on the devices."""
    out = []
    for i in range(steps):
        indices, mask = stage.sampler.batch(i)
        batch = distributed.shard_batch({k: v[public_stages.local_slice(indices)] for k, v in stage.examples.items()},
                                        stage.mesh)
        mask = distributed.shard_batch(public_stages.local_slice(mask), stage.mesh)
        out.append(block((batch, mask, jax.random.fold_in(stage.key, i))))
    return out


def run_raw(stage: DpFinetune, batches: list) -> float:
    state = stage.state
    t0 = time.perf_counter()
    for batch, mask, key in batches:
        state, _ = stage.step_fn(state, batch, mask, key)
    block(state)
    return time.perf_counter() - t0


def run_loop(stage: DpFinetune, root: Path, steps: int, every: int, log_every: int) -> float:
    """One fresh stage run of `steps` steps (new directory, empty ledger) through `loop.run`."""
    stage.ledger = privacy.PrivacyLedger(stage.params)
    stage.guard = privacy.BudgetGuard(stage.ledger)
    with stage.config.unlocked():
        stage.config.log_every_steps = log_every  # `DpFinetune.after_step` computes epsilon on these steps
    directory = Path(tempfile.mkdtemp(dir=root))
    task = dataclasses.replace(stage.task(), total_steps=steps)
    t0 = time.perf_counter()
    result = loop.run(task, str(directory), checkpoint_every=every, max_to_keep=2, log_every=log_every)
    seconds = time.perf_counter() - t0
    assert result.finished and result.step == steps, result
    shutil.rmtree(directory)
    return seconds


def per_call_us(fn: Callable[[int], Any], calls: int) -> float:
    t0 = time.perf_counter()
    for i in range(calls):
        fn(i)
    return (time.perf_counter() - t0) / calls * 1e6


def host_work(stage: DpFinetune, root: Path, steps: int) -> list[dict]:
    """Mean time per call of each per-step host operation of the DP loop, in isolation."""
    ledger = privacy.PrivacyLedger(stage.params)
    guard = privacy.BudgetGuard(ledger)
    guard.can_step(1)  # the budget search runs once per stage; time it separately below
    _, metrics = stage.step_fn(stage.state, *pre_drawn(stage, 1)[0])
    indices = [stage.sampler.batch(i)[0] for i in range(steps)]
    rows = []
    with Checkpointer(root / "host_ckpt") as ckpt, MetricWriter(root / "host_metrics", is_process0=True,
                                                                stage="bench") as writer:
        pieces = {
            "sampler.batch": lambda i: stage.sampler.batch(i),
            "gather + shard_batch": lambda i: distributed.shard_batch(
                {k: v[indices[i]] for k, v in stage.examples.items()}, stage.mesh),
            "fold_in(key, step)": lambda i: jax.random.fold_in(stage.key, i),
            "ledger.record_steps(1)": lambda i: ledger.record_steps(1),
            "guard.can_step(1)": lambda i: guard.can_step(1),
            "reached_preemption": lambda i: ckpt.reached_preemption(i),
            "device_get(metrics)": lambda i: jax.device_get(metrics),
            "write_scalars": lambda i: writer.write_scalars(i, {"epsilon": 1.0}),
        }
        for name, fn in pieces.items():
            rows.append({"operation": name, "us_per_call": per_call_us(fn, steps)})
    def spent(n: int) -> privacy.PrivacyLedger:
        fresh = privacy.PrivacyLedger(stage.params)
        fresh.record_steps(n)
        return fresh

    rows.append({"operation": f"ledger.epsilon() after {steps} steps (uncached)",
                 "us_per_call": per_call_us(lambda i: spent(steps).epsilon(), 3)})
    rows.append({"operation": "budget search (once per stage)",
                 "us_per_call": per_call_us(lambda i: privacy.BudgetGuard(spent(0)).can_step(1), 1)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="N: runs of N and 2N steps are timed")
    parser.add_argument("--every", type=int, default=10, help="checkpoint interval of the ckpt variant")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="/tmp/bench_loop.json")
    args = parser.parse_args()
    n, never = args.steps, 2 * args.steps + 1

    root = Path(tempfile.mkdtemp(prefix="bench_loop_"))
    try:
        stage = make_stage(root / "work", 2 * n, args.log_every)
        batches = pre_drawn(stage, 2 * n)
        variants = {
            "raw dp_step": lambda k: run_raw(stage, batches[:k]),
            f"loop, epsilon every {args.log_every}": lambda k: run_loop(stage, root, k, never, args.log_every),
            "loop, epsilon only at the end": lambda k: run_loop(stage, root, k, never, never),
            f"loop, epsilon every {args.log_every}, ckpt every {args.every}":
                lambda k: run_loop(stage, root, k, args.every, args.log_every),
        }
        times: dict[str, dict[int, list[float]]] = {name: {n: [], 2 * n: []} for name in variants}
        for rep in range(args.repeats + 1):  # repeat 0 compiles every bucket shape and warms up
            for name, fn in variants.items():
                for k in (n, 2 * n):
                    seconds = fn(k)
                    if rep:
                        times[name][k].append(seconds)
        host = host_work(stage, root, n)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    rows = []
    for name in variants:
        short, long = (statistics.median(times[name][k]) for k in (n, 2 * n))
        per_step = (long - short) / n
        rows.append({"variant": name, "ms_per_step": 1e3 * per_step, "steps_per_s": 1 / per_step,
                     "fixed_s": short - n * per_step})
    raw, logged, silent, ckpt = (row["ms_per_step"] for row in rows)
    for row in rows:
        row["fraction_of_raw"] = raw / row["ms_per_step"]
    derived = {"loop_rate_fraction_of_raw": raw / logged,
               "checkpoint_overhead": ckpt / logged - 1,
               "epsilon_logging_ms_per_step": logged - silent}
    print(f"DP stage (mnist tiny): runs of {n} and {2 * n} steps, per-step cost = difference / {n}; buckets "
          f"{stage.sampler.buckets}, noise {stage.params.noise_multiplier:.4g}, {jax.device_count()} "
          f"{jax.devices()[0].platform} device(s), medians of {args.repeats}")
    print_table(rows, ["variant", "ms_per_step", "steps_per_s", "fraction_of_raw", "fixed_s"])
    print()
    print_table([{"derived": k, "value": v} for k, v in derived.items()])
    print()
    print_table(host, ["operation", "us_per_call"])
    write_json(args.out, "bench_loop", rows, derived=derived, host_work=host,
               raw_seconds={name: {str(k): v for k, v in t.items()} for name, t in times.items()},
               steps=n, every=args.every, log_every=args.log_every, repeats=args.repeats)


if __name__ == "__main__":
    main()
