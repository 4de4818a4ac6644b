"""DP training step vs non-DP step on a 3.7M-parameter AR transformer, side by side.

    python -m experiments.bench.bench_dp_step --out /tmp/bench_dp_step.json   # 75 min, 2 busy cores
    python -m experiments.bench.bench_dp_step --quick                         # 7 min, small model

Model: dpwave.models.transformer.ARTransformer, 4 layers, width 256, 4 heads, MLP 1024,
sequence 64, vocabulary 1024 (3.7M parameters); batch 64; Adam; flat clipping C = 1; noise
multiplier 1. Modes: the non-DP step; DP steps with full vmap, microbatches 4/8/16/32, and ghost
norms (whole batch, and microbatch 32; the DP stage's default). `dp_ghost_mb32_uncertified` is the
ghost path with the plain float32 norm formula that preceded the certified bound (it can undercount
a norm, see dpwave/privacy/ghost.py): the cost of the numerical fix, measured side by side.

Time: for each malloc setting (glibc default; MALLOC_MMAP_MAX_=0 with
MALLOC_TRIM_THRESHOLD_=100000000000, the intended value of "1e11", which glibc would parse as 1)
one process compiles every mode, then times them round-robin; the median step is reported.
Memory: XLA's estimate for the compiled step (arguments + outputs + temporaries - aliased), and,
per mode in a fresh process, the resident peak of two steps with compilation excluded (malloc_trim,
then VmHWM reset, then the steps).
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dpwave.models.transformer import ARTransformer, TransformerConfig, batch_loss, per_example_loss
from dpwave.privacy import ghost
from dpwave.privacy.clipping import clipped_grad
from dpwave.privacy.keys import example_keys
from dpwave.privacy.optimizers import dp_optimizer
from experiments.bench.common import print_table, write_json

MALLOC = {"default": {}, "tuned": {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}}
MODES: dict[str, dict[str, Any] | None] = {
    "non_dp": None,
    "dp_vmap": {},
    "dp_mb4": {"microbatch_size": 4},
    "dp_mb8": {"microbatch_size": 8},
    "dp_mb16": {"microbatch_size": 16},
    "dp_mb32": {"microbatch_size": 32},
    "dp_ghost": {"use_ghost_norms": True},
    "dp_ghost_mb32": {"use_ghost_norms": True, "microbatch_size": 32},
    "dp_ghost_mb32_uncertified": {"use_ghost_norms": True, "microbatch_size": 32, "uncertified": True},
}
QUICK_MODES = ["non_dp", "dp_mb8", "dp_ghost"]
SIZES = {
    "full": dict(vocab_size=1024, seq_len=64, width=256, depth=4, num_heads=4, mlp_dim=1024, batch=64),
    "quick": dict(vocab_size=256, seq_len=32, width=64, depth=2, num_heads=4, mlp_dim=256, batch=32),
}


def _build(size: dict[str, int]):
    """(graphdef, params, batch, mask) of the benchmark model."""
    arch = {k: v for k, v in size.items() if k != "batch"}
    graphdef, params = nnx.split(ARTransformer(TransformerConfig(**arch), rngs=nnx.Rngs(0)), nnx.Param)
    tokens = jax.random.randint(jax.random.key(1), (size["batch"], size["seq_len"]), 0, size["vocab_size"])
    return graphdef, params, {"tokens": tokens}, jnp.ones((size["batch"],), jnp.float32)


def _uncertified_norm(x: jax.Array, d: jax.Array) -> jax.Array:
    """The ghost norm before the certified bound: the plain float32 formulas (reference for timing)."""
    n, k, m = x.shape[1], x.shape[2], d.shape[2]
    if n * (k + m) < k * m:
        gx = jnp.einsum("bnk,bsk->bns", x, x, precision=jax.lax.Precision.HIGHEST)
        gd = jnp.einsum("bnm,bsm->bns", d, d, precision=jax.lax.Precision.HIGHEST)
        return jnp.sqrt(jnp.sum(gx * gd, axis=(1, 2)))
    g = jnp.einsum("bnk,bnm->bkm", x, d, precision=jax.lax.Precision.HIGHEST)
    return jnp.sqrt(jnp.sum(jnp.square(g), axis=(1, 2)))


def _step_fn(mode: str, graphdef: nnx.GraphDef, batch_size: int):
    """(jitted step(params, opt_state, batch, mask, rng) -> (params, opt_state, loss), optimizer)."""
    options = None if MODES[mode] is None else dict(MODES[mode])
    if options is None:
        opt = optax.adam(1e-4)

        def grads(params, batch, mask, rng):
            del mask
            return jax.value_and_grad(lambda p: batch_loss(graphdef, p, batch, rng))(params)
    else:
        opt = dp_optimizer(optax.adam(1e-4), l2_clip=1.0, noise_multiplier=1.0, expected_batch_size=batch_size, key=0)
        uncertified = options.pop("uncertified", False)
        clipped = clipped_grad(lambda p, ex, r: per_example_loss(graphdef, p, ex, r), l2_clip=1.0, **options)

        def grads(params, batch, mask, rng):
            certified = ghost._norm_bound
            ghost._norm_bound = _uncertified_norm if uncertified else certified  # only while tracing
            try:
                grad_sum, aux = clipped(params, batch, mask, example_keys(rng, batch))
            finally:
                ghost._norm_bound = certified
            return aux.losses.mean(), grad_sum

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, batch, mask, rng):
        loss, g = grads(params, batch, mask, rng)
        updates, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step, opt


def _prepared(mode: str, size: dict[str, int]) -> list[Any]:
    """[compiled step, params, opt_state, batch, mask] for one mode."""
    graphdef, params, batch, mask = _build(size)
    step, opt = _step_fn(mode, graphdef, size["batch"])
    state = opt.init(params)
    compiled = step.lower(params, state, batch, mask, jax.random.key(0)).compile()
    return [compiled, params, state, batch, mask]


def _xla_mb(compiled: Any) -> float:
    m = compiled.memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes) / 2**20


def _proc_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def _run(prep: list[Any], seed: int) -> None:
    compiled, params, state, batch, mask = prep
    prep[1], prep[2], _ = jax.block_until_ready(compiled(params, state, batch, mask, jax.random.key(seed)))


def time_worker(modes: list[str], size: dict[str, int], rounds: int) -> dict[str, Any]:
    """Compiles the modes, then times them round-robin (one warm-up round)."""
    prepared = {m: _prepared(m, size) for m in modes}
    times: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(rounds + 1):
        for mode in modes[r % len(modes) :] + modes[: r % len(modes)]:
            start = time.perf_counter()
            _run(prepared[mode], r)
            if r:
                times[mode].append(time.perf_counter() - start)
    return {
        m: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "xla_mb": _xla_mb(prepared[m][0])}
        for m, t in times.items()
    }


def memory_worker(mode: str, size: dict[str, int]) -> dict[str, float]:
    """Resident peak of two steps of one mode, compilation excluded (run in a fresh process)."""
    prep = _prepared(mode, size)
    _run(prep, 0)
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand compiler and warm-up scratch back to the OS
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := current RSS
    before = _proc_kb("VmRSS")
    for seed in (1, 2):
        _run(prep, seed)
    peak = _proc_kb("VmHWM")
    return {"rss_peak_mb": peak / 1024, "rss_growth_mb": (peak - before) / 1024}


def _worker(args: list[str], malloc: str) -> Any:
    cmd = [sys.executable, "-m", "experiments.bench.bench_dp_step", *args]
    out = subprocess.run(cmd, env={**os.environ, **MALLOC[malloc]}, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model, 3 modes, 3 rounds")
    parser.add_argument("--modes", default=None, help=f"comma-separated subset of {list(MODES)}")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 5; quick 3)")
    parser.add_argument("--out", default="/tmp/bench_dp_step.json")
    parser.add_argument("--worker", choices=["time", "memory"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    size_name = "quick" if args.quick else "full"
    modes = args.modes.split(",") if args.modes else (QUICK_MODES if args.quick else list(MODES))
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not (args.worker or "non_dp" in modes):
        parser.error(f"--modes takes names from {list(MODES)}, non_dp included (the baseline); unknown: {unknown}")
    rounds = args.rounds or (3 if args.quick else 5)
    size = SIZES[size_name]
    if args.worker == "time":
        print(json.dumps(time_worker(modes, size, rounds)))
        return
    if args.worker == "memory":
        print(json.dumps(memory_worker(modes[0], size)))
        return

    common = ["--rounds", str(rounds)] + (["--quick"] if args.quick else [])
    timed = {mal: _worker(["--worker", "time", "--modes", ",".join(modes), *common], mal) for mal in MALLOC}
    rss = {m: _worker(["--worker", "memory", "--modes", m, *common], "default") for m in modes}
    rows = []
    for mal, t in timed.items():
        base = t["non_dp"]
        for m in modes:
            rows.append(
                {
                    "mode": m,
                    "malloc": mal,
                    "step_s": t[m]["median_s"],
                    "step_x": t[m]["median_s"] / base["median_s"],
                    "min_s": t[m]["min_s"],
                    "max_s": t[m]["max_s"],
                    "xla_mb": t[m]["xla_mb"],
                    "xla_x": t[m]["xla_mb"] / base["xla_mb"],
                }
            )
    for m in modes:
        rows.append(
            {
                "mode": m,
                "malloc": "default",
                **rss[m],
                "rss_growth_x": rss[m]["rss_growth_mb"] / rss["non_dp"]["rss_growth_mb"],
            }
        )
    print_table(
        [r for r in rows if "step_s" in r], ["mode", "malloc", "step_s", "step_x", "min_s", "max_s", "xla_mb", "xla_x"]
    )
    print()
    print_table(
        [r for r in rows if "rss_peak_mb" in r], ["mode", "malloc", "rss_peak_mb", "rss_growth_mb", "rss_growth_x"]
    )
    write_json(args.out, "dp_step", rows, size=size, rounds=rounds, malloc=MALLOC, load_average=os.getloadavg())


if __name__ == "__main__":
    main()
