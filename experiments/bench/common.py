"""Shared helpers for benchmark scripts: timing, a printed table, a JSON record."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

from dpwave import files


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
