"""Which allocator and XLA settings speed up the training steps on a CPU: each setting in its own processes.

    python -m experiments.bench.bench_cpu_settings --out experiments/bench/results/bench_cpu_settings.json
    python -m experiments.bench.bench_cpu_settings --quick     # bench_dp_step's small model, 2 rounds

A setting is environment variables read at process start (glibc's malloc tunables, XLA_FLAGS), so it cannot
be switched inside one process: every round starts one fresh process per setting, in a rotating order, and
each process compiles bench_dp_step's `non_dp` and `dp_ghost_mb8` steps (3.7M-parameter AR transformer,
batch 64, Adam; ghost norms, microbatch 8) and times `--steps` steps of each after one warm-up step. Reported
per setting: the median over rounds of each process's median step, its ratio to the default setting's, the
compile time, and the resident peak. A setting is a pure win where both steps are faster in every round and
its resident peak is not higher; `launch/common.sh` sets those (see experiments/bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Any

import jax

from experiments.bench import bench_dp_step as dp_step
from experiments.bench.common import print_table, write_json

MALLOC_TUNED = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}
SETTINGS: dict[str, dict[str, str]] = {
    "default": {},
    "malloc_tuned": MALLOC_TUNED,
    "xla_onednn": {"XLA_FLAGS": "--xla_cpu_use_onednn=true"},
    "xla_xnnpack": {"XLA_FLAGS": "--xla_cpu_use_xnnpack=true"},
    "xla_concurrency_scheduler": {"XLA_FLAGS": "--xla_cpu_enable_concurrency_optimized_scheduler=true"},
}
STEPS = ("non_dp", "dp_ghost_mb8")


def worker(size_name: str, steps: int) -> dict[str, Any]:
    """Compiles both steps, times them alternately; medians, compile seconds and the resident peak (kB)."""
    size = dp_step.SIZES[size_name]
    start = time.perf_counter()
    prepared = {m: dp_step._prepared(m, size) for m in STEPS}
    compile_s = time.perf_counter() - start
    times: dict[str, list[float]] = {m: [] for m in STEPS}
    for i in range(steps + 1):
        for mode in STEPS:
            t = time.perf_counter()
            dp_step._run(prepared[mode], i)
            if i:
                times[mode].append(time.perf_counter() - t)
    with open("/proc/self/status") as f:
        peak_kb = int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1))
    return {"median_s": {m: statistics.median(t) for m, t in times.items()}, "compile_s": compile_s,
            "rss_peak_mb": peak_kb / 1024}


def _run_setting(name: str, size_name: str, steps: int) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", *MALLOC_TUNED)} | SETTINGS[name]
    cmd = [sys.executable, "-m", "experiments.bench.bench_cpu_settings", "--worker", "--size", size_name,
           "--steps", str(steps)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"setting {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="bench_dp_step's small model, 2 rounds, 5 steps")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated subset of {list(SETTINGS)}")
    parser.add_argument("--rounds", type=int, default=None, help="processes per setting (default 3; quick 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per process (default 10; quick 5)")
    parser.add_argument("--out", default="/tmp/bench_cpu_settings.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", default="full", choices=sorted(dp_step.SIZES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    steps = args.steps or (5 if args.quick else 10)
    if args.worker:
        print(json.dumps(worker(args.size, steps)))
        return
    names = args.settings.split(",")
    unknown = sorted(set(names) - set(SETTINGS))
    if unknown or "default" not in names:
        parser.error(f"--settings takes names from {list(SETTINGS)}, default included (the baseline); "
                     f"unknown: {unknown}")
    size_name, rounds = ("quick" if args.quick else "full"), args.rounds or (2 if args.quick else 3)
    load_before = os.getloadavg()
    results: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            results[name].append(_run_setting(name, size_name, steps))
    base = {m: statistics.median(x["median_s"][m] for x in results["default"]) for m in STEPS}
    rows = []
    for name in names:
        row: dict[str, Any] = {"setting": name, "env": " ".join(f"{k}={v}" for k, v in SETTINGS[name].items()) or "-"}
        for m in STEPS:
            per_round = [x["median_s"][m] for x in results[name]]
            row[f"{m}_s"] = statistics.median(per_round)
            row[f"{m}_x"] = row[f"{m}_s"] / base[m]
            row[f"{m}_rounds_s"] = per_round
        row["compile_s"] = statistics.median(x["compile_s"] for x in results[name])
        row["rss_peak_mb"] = statistics.median(x["rss_peak_mb"] for x in results[name])
        rows.append(row)
    print_table(rows, ["setting", "env", *(f"{m}_{k}" for m in STEPS for k in ("s", "x")), "compile_s", "rss_peak_mb"])
    write_json(args.out, "cpu_settings", rows, size=dp_step.SIZES[size_name], rounds=rounds, steps=steps,
               jax_version=jax.__version__, load_average_before=load_before, load_average_after=os.getloadavg())


if __name__ == "__main__":
    main()
