"""The stage loop's cost on a DP stage: `DpSgdRun.train` vs the raw jitted `dp_step`, in one process.

    python -m experiments.bench.bench_loop --out /tmp/bench_loop.json [--steps 40 --every 10 --repeats 5]

Stage: `mnist.py:tiny`'s DP finetuning (2,000 private digits, expected batch 64, microbatch 8, noise
calibrated to epsilon 10 over N = --steps steps, budget guard on). Its tokenizer (2 steps) and AR model (0
steps: the initialization) are barely trained: their quality does not change the cost of a step.

Per step: the mean over steps 1 .. N-2 (from starting step 1 to the device finishing step N-2), so
what a stage pays once (restore attempt, writers, the budget search before step 0, the final
checkpoint, epsilon and hash) stays out; `total_s` has it. Timed alternately, medians over --repeats,
after one warm-up of each:

  raw dp_step                  the stage's jitted step over pre-drawn, pre-sharded batches
  loop, epsilon every L        the DP stage's loop (`DpSgdRun.train` over `loop.StageLoop`): sampler,
                               gather and transfer, ledger, budget guard,
                               epsilon at log steps, metrics, progress, preemption check
  loop, epsilon only at end    the same with no log step before the last (isolates the accountant)
  ... ckpt every k             the first loop, plus a checkpoint every --every steps
  ... + eager fold_in          the second loop, plus one eager op per step (the stage's old host-side
                               key folding: on CPU it waits for the running step)

Derived: the loop's rate as a fraction of raw (goal >= 90%), the checkpoint overhead (goal < 5%) and
the per-step cost of logging epsilon. A second table times each piece of per-step host work in
isolation (microseconds per call).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp

from dpwave import privacy
from dpwave.train import distributed, loop, pipeline, settings
from dpwave.train.checkpoint import Checkpointer
from dpwave.train.metrics import MetricWriter
from dpwave.train.stages.base import Context, run_task
from dpwave.train.stages.dp_finetune import DpRun
from dpwave.train.stages.pretrain import STAGE as PRETRAIN
from dpwave.train.stages.tokenizer import STAGE as TOKENIZER
from experiments.bench.common import block, print_table, write_json
from experiments.configs import mnist


def make_stage(workdir: Path, steps: int) -> DpRun:
    config = mnist.get_config("tiny")
    with config.unlocked():
        config.tokenizer.steps, config.pretrain.steps = 2, 0  # its schedule needs >= 2 steps
        config.dp.mechanism.steps = steps
        config.dp.secret.seed = 0
    run = settings.read(config)
    ctx = Context(run, str(workdir), distributed.make_data_mesh(), pipeline.stage_inputs(run))
    for stage in (TOKENIZER, PRETRAIN):
        run_task(ctx, stage.task(ctx))
    return DpRun(run, ctx.mesh, stage_dir=ctx.dir("dp_finetune"), tokenizer_dir=ctx.dir("tokenizer"),
                 pretrain_dir=ctx.dir("pretrain"))


def pre_drawn(stage: DpRun, steps: int) -> list[tuple[Any, Any]]:
    """What the DP loop (`DpSgdRun.train`) feeds `dp_step`, computed ahead and resident on the devices."""
    out = []
    for i in range(steps):
        indices, mask = stage.sampler.batch(i)
        batch = distributed.shard_batch({k: v[distributed.local_slice(indices)] for k, v in stage.examples.items()},
                                        stage.mesh)
        mask = distributed.shard_batch(distributed.local_slice(mask), stage.mesh)
        out.append(block((batch, mask)))
    return out


def _copy_state(stage: DpRun) -> Any:
    """A copy of the stage's initial state to step from: the step consumes (donates) the state it is given."""
    return jax.tree.map(jnp.copy, stage.state)


def run_raw(stage: DpRun, batches: list) -> tuple[float, float]:
    """(seconds per step over steps 1 .. N-2, total seconds) of the jitted step over `batches`."""
    n, state, marks = len(batches), _copy_state(stage), {}
    t0 = time.perf_counter()
    for i, (batch, mask) in enumerate(batches):
        _mark(marks, state, i, n)
        state, _ = stage.step_fn(state, batch, mask, stage.key, i)
    block(state)
    return (marks["end"] - marks["start"]) / (n - 2), time.perf_counter() - t0


def run_loop(stage: DpRun, root: Path, steps: int, every: int, log_every: int,
             eager_op: bool = False) -> tuple[float, float]:
    """(seconds per step over steps 1 .. N-2, total seconds) of one fresh stage run (new directory, empty
    ledger) of the DP stage's loop (`DpSgdRun.train`). `eager_op` adds what the stage did before the key moved
    into the jitted step: one eager `fold_in(key, step)` per step."""
    stage.use_ledger(stage.mechanism.ledger())
    marks: dict[str, float] = {}
    step_fn = stage.step_fn

    def step(state: Any, *args: Any) -> Any:
        i = args[-1]
        _mark(marks, state, i, steps)
        if eager_op:
            jax.random.fold_in(stage.key, i)
        return step_fn(state, *args)

    stage.step_fn, initial, stage.state = step, stage.state, _copy_state(stage)
    directory = Path(tempfile.mkdtemp(dir=root))
    options = loop.LoopOptions(checkpoint_every=every, max_to_keep=2, log_every=log_every)
    t0 = time.perf_counter()
    try:
        result = stage.train(loop.StageLoop("dp_finetune", str(directory), options, private=True))
    finally:
        stage.step_fn, stage.state = step_fn, initial
    total = time.perf_counter() - t0
    assert result.finished and result.step == steps, result
    shutil.rmtree(directory)
    return (marks["end"] - marks["start"]) / (steps - 2), total


def _mark(marks: dict[str, float], state: Any, i: int, steps: int) -> None:
    """Window of the per-step time: from starting step 1 to the device finishing step `steps - 2`."""
    if i == 1:
        marks["start"] = time.perf_counter()
    elif i == steps - 1:
        block(state)
        marks["end"] = time.perf_counter()


def per_call_us(fn: Callable[[int], Any], calls: int) -> float:
    t0 = time.perf_counter()
    for i in range(calls):
        fn(i)
    return (time.perf_counter() - t0) / calls * 1e6


def host_work(stage: DpRun, root: Path, steps: int) -> list[dict]:
    """Mean time per call of each per-step host operation of the DP loop, in isolation."""
    ledger = stage.mechanism.ledger()
    guard = privacy.BudgetGuard(ledger)
    guard.can_step(1)  # the budget search runs once per stage; time it separately below
    _, metrics = stage.step_fn(_copy_state(stage), *pre_drawn(stage, 1)[0], stage.key, 0)
    indices = [stage.sampler.batch(i)[0] for i in range(steps)]
    rows = []
    with Checkpointer(root / "host_ckpt") as ckpt, MetricWriter(root / "host_metrics", is_process0=True,
                                                                stage="bench") as writer:
        pieces = {
            "sampler.batch": lambda i: stage.sampler.batch(i),
            "gather + shard_batch": lambda i: distributed.shard_batch(
                {k: v[indices[i]] for k, v in stage.examples.items()}, stage.mesh),
            "ledger.record_steps(1)": lambda i: ledger.record_steps(1),
            "guard.can_step(1)": lambda i: guard.can_step(1),
            "reached_preemption": lambda i: ckpt.reached_preemption(i),
            "device_get(metrics)": lambda i: jax.device_get(metrics),
            "write_scalars": lambda i: writer.write_scalars(i, {"epsilon": 1.0}),
        }
        for name, fn in pieces.items():
            rows.append({"operation": name, "us_per_call": per_call_us(fn, steps)})
    def spent(n: int) -> privacy.PrivacyLedger:
        fresh = stage.mechanism.ledger()
        fresh.record_steps(n)
        return fresh

    rows.append({"operation": f"ledger.epsilon() after {steps} steps (uncached)",
                 "us_per_call": per_call_us(lambda i: spent(steps).epsilon(), 3)})
    rows.append({"operation": "budget search (once per stage)",
                 "us_per_call": per_call_us(lambda i: privacy.BudgetGuard(spent(0)).can_step(1), 1)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=10, help="checkpoint interval of the ckpt variant")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="/tmp/bench_loop.json")
    args = parser.parse_args()
    n, never = args.steps, args.steps + 1

    root = Path(tempfile.mkdtemp(prefix="bench_loop_"))
    try:
        stage = make_stage(root / "work", n)
        batches = pre_drawn(stage, n)
        variants = {
            "raw dp_step": lambda: run_raw(stage, batches),
            f"loop, epsilon every {args.log_every}": lambda: run_loop(stage, root, n, never, args.log_every),
            "loop, epsilon only at the end": lambda: run_loop(stage, root, n, never, never),
            f"loop, epsilon every {args.log_every}, ckpt every {args.every}":
                lambda: run_loop(stage, root, n, args.every, args.log_every),
            "loop, epsilon only at the end, + eager fold_in": lambda: run_loop(stage, root, n, never, never, True),
        }
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
        for rep in range(args.repeats + 1):  # repeat 0 compiles every bucket shape and warms up
            for name, fn in variants.items():
                result = fn()
                if rep:
                    times[name].append(result)
        host = host_work(stage, root, n)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    rows = []
    for name in variants:
        per_step, total = (statistics.median(t[j] for t in times[name]) for j in (0, 1))
        rows.append({"variant": name, "ms_per_step": 1e3 * per_step, "steps_per_s": 1 / per_step,
                     "total_s": total})
    raw, logged, silent, ckpt, _ = (row["ms_per_step"] for row in rows)
    for row in rows:
        row["fraction_of_raw"] = raw / row["ms_per_step"]
    derived = {"loop_rate_fraction_of_raw": raw / logged,
               "loop_rate_fraction_of_raw_without_epsilon_logging": raw / silent,
               "checkpoint_overhead": ckpt / logged - 1,
               "epsilon_logging_ms_per_step": logged - silent}
    print(f"DP stage (mnist tiny): {n} steps, buckets {stage.sampler.buckets}, noise "
          f"{stage.mechanism.params.noise_multiplier:.4g}, {jax.device_count()} {jax.devices()[0].platform} device(s), "
          f"medians of {args.repeats}")
    print_table(rows, ["variant", "ms_per_step", "steps_per_s", "fraction_of_raw", "total_s"])
    print()
    print_table([{"derived": k, "value": v} for k, v in derived.items()])
    print()
    print_table(host, ["operation", "us_per_call"])
    write_json(args.out, "bench_loop", rows, derived=derived, host_work=host,
               raw_seconds={name: [list(t) for t in runs] for name, runs in times.items()},
               steps=n, every=args.every, log_every=args.log_every, repeats=args.repeats)


if __name__ == "__main__":
    main()
