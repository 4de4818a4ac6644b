"""Shared helpers for benchmark scripts: timing, a printed table, a JSON record, the pipeline's public stages."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

from dpwave import files
from dpwave.train import distributed, pipeline
from dpwave.train import settings as settings_lib
from dpwave.train.stages.base import Context, Stage
from experiments.configs import mnist


def block(x: Any) -> Any:
    return jax.block_until_ready(x)


def median_seconds(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of `fn()` (blocked on its JAX outputs) over `repeats` runs after `warmup`."""
    for _ in range(warmup):
        block(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        block(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def print_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> None:
    """Prints rows (dicts) as a markdown table."""
    columns = list(columns or rows[0].keys())
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |")


def write_json(path: str, name: str, rows: Sequence[dict], **extra: Any) -> None:
    """Writes the benchmark record with the machine it ran on; atomically."""
    record = {
        "benchmark": name,
        "rows": list(rows),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__,
                    "devices": [str(d) for d in jax.devices()]},
        **extra,
    }
    files.write_json(path, record, sort_keys=False)
    print(f"wrote {path}")


def demo_settings() -> settings_lib.Settings:
    """The settings of `experiments/configs/mnist.py:demo`; benchmarks replace the parts they vary."""
    return settings_lib.read(mnist.get_config("demo"))


def train_stage(stage: Stage, settings: settings_lib.Settings, workdir: str | os.PathLike) -> tuple[Any, float]:
    """Runs the pipeline's own `stage` (a public training stage of dpwave.train.stages) on `settings` in
    `workdir/<stage>`, through the run's loop (checkpoints, metrics.jsonl); returns the trained model and the wall
    seconds (compilation and checkpoints included)."""
    ctx = Context(settings, os.fspath(workdir), distributed.make_data_mesh(), pipeline.stage_inputs(settings))
    start = time.perf_counter()
    stage.run(ctx)
    seconds = time.perf_counter() - start
    return stage.model(settings, ctx.dir(stage.name)), seconds


def last_logged(workdir: str | os.PathLike, stage: Stage) -> dict:
    """The stage's last metrics.jsonl record (its final step's metrics)."""
    lines = files.read_text(f"{os.fspath(workdir)}/{stage.name}/metrics.jsonl").splitlines()
    return json.loads(lines[-1])
