"""DP training step vs non-DP step on a 3.7M-parameter AR transformer, side by side.

    python -m experiments.bench.bench_dp_step --out /tmp/bench_dp_step.json   # 75 min, 2 busy cores
    python -m experiments.bench.bench_dp_step --quick                         # 7 min, small model
    python -m experiments.bench.bench_dp_step --model pixel_flow --modes non_dp,dp_mb8,dp_ghost_mb8   # U-Net

Model: dpwave.models.transformer.ARTransformer, 4 layers, width 256, 4 heads, MLP 1024,
sequence 64, vocabulary 1024 (3.7M parameters); or, with `--model pixel_flow`, the dp_diffusion baseline's
U-Net as the style table builds it (32x32x1, width 16, 2 blocks, 10 classes, condition dropout 0.1);
batch 64; Adam; flat clipping C = 1; noise multiplier 1. Modes: the non-DP step; DP steps with full vmap,
microbatches 4/8/16/32, and ghost norms (whole batch, and microbatches 8 (the CPU configs' setting), 16, 32).
`dp_ghost_mb32_uncertified` is the ghost path with the plain float32 norm formula that preceded the certified
bound (it can undercount a norm, see dpwave/privacy/ghost.py): the cost of the numerical fix, measured side by
side. `dp_ghost_mb8_old_routes` is the ghost path with per-example gradients for embedding tables and conv
kernels, as before they had their own routes.

Time: for each malloc setting (glibc default; MALLOC_MMAP_MAX_=0 with
MALLOC_TRIM_THRESHOLD_=100000000000, the intended value of "1e11", which glibc would parse as 1)
one process compiles every mode, then times them round-robin; the median step is reported.
Memory: XLA's estimate for the compiled step (arguments + outputs + temporaries - aliased), and,
per mode and malloc setting in a fresh process, the resident peak of two steps with compilation excluded
(malloc_trim, then VmHWM reset, then the steps).
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
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dpwave.models import pixel_flow
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
    "dp_ghost_mb8": {"use_ghost_norms": True, "microbatch_size": 8},
    "dp_ghost_mb16": {"use_ghost_norms": True, "microbatch_size": 16},
    "dp_ghost_mb32": {"use_ghost_norms": True, "microbatch_size": 32},
    "dp_ghost_mb32_uncertified": {"use_ghost_norms": True, "microbatch_size": 32, "uncertified": True},
    # The ghost path before embedding tables and conv kernels had their own routes (per-example gradients for them).
    "dp_ghost_mb8_old_routes": {"use_ghost_norms": True, "microbatch_size": 8, "old_routes": True},
}
QUICK_MODES = ["non_dp", "dp_mb8", "dp_ghost"]
SIZES = {
    "full": dict(vocab_size=1024, seq_len=64, width=256, depth=4, num_heads=4, mlp_dim=1024, batch=64),
    "quick": dict(vocab_size=256, seq_len=32, width=64, depth=2, num_heads=4, mlp_dim=256, batch=32),
}
# --model pixel_flow: the dp_diffusion baseline's U-Net as the style table's config builds it (mnist.py:style).
PIXEL_SIZES = {
    "full": dict(image_size=32, channels=1, num_classes=10, width=16, num_blocks=2, cond_dropout=0.1, batch=64),
    "quick": dict(image_size=8, channels=1, num_classes=10, width=8, num_blocks=1, cond_dropout=0.1, batch=16),
}
MODELS = {"transformer": SIZES, "pixel_flow": PIXEL_SIZES}


def _build(size: dict[str, Any]):
    """(graphdef, params, batch, mask) of the benchmark model (the pixel flow model where `size` has image_size)."""
    arch = {k: v for k, v in size.items() if k != "batch"}
    if "image_size" in size:
        model = pixel_flow.PixelFlow(pixel_flow.PixelFlowConfig(**arch), rngs=nnx.Rngs(0))
        shape = (size["batch"], size["image_size"], size["image_size"], size["channels"])
        batch = {"image": jax.random.uniform(jax.random.key(1), shape, minval=-1.0, maxval=1.0),
                 "label": jax.random.randint(jax.random.key(2), (size["batch"],), 0, size["num_classes"])}
    else:
        model = ARTransformer(TransformerConfig(**arch), rngs=nnx.Rngs(0))
        batch = {"tokens": jax.random.randint(jax.random.key(1), (size["batch"], size["seq_len"]), 0,
                                              size["vocab_size"])}
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params, batch, jnp.ones((size["batch"],), jnp.float32)


def _losses(size: dict[str, Any]) -> tuple[Callable, Callable]:
    """(batch_loss, per_example_loss) of the model `_build(size)` builds."""
    if "image_size" in size:
        return pixel_flow.batch_loss, pixel_flow.example_loss
    return batch_loss, per_example_loss


def _uncertified_norm(x: jax.Array, d: jax.Array) -> jax.Array:
    """The ghost norm before the certified bound: the plain float32 formulas (reference for timing)."""
    n, k, m = x.shape[1], x.shape[2], d.shape[2]
    if n * (k + m) < k * m:
        gx = jnp.einsum("bnk,bsk->bns", x, x, precision=jax.lax.Precision.HIGHEST)
        gd = jnp.einsum("bnm,bsm->bns", d, d, precision=jax.lax.Precision.HIGHEST)
        return jnp.sqrt(jnp.sum(gx * gd, axis=(1, 2)))
    g = jnp.einsum("bnk,bnm->bkm", x, d, precision=jax.lax.Precision.HIGHEST)
    return jnp.sqrt(jnp.sum(jnp.square(g), axis=(1, 2)))


def _step_fn(mode: str, graphdef: nnx.GraphDef, size: dict[str, Any]):
    """(jitted step(params, opt_state, batch, mask, rng) -> (params, opt_state, loss), optimizer)."""
    options = None if MODES[mode] is None else dict(MODES[mode])
    batch_loss, per_example_loss = _losses(size)
    if options is None:
        opt = optax.adam(1e-4)

        def grads(params, batch, mask, rng):
            del mask
            return jax.value_and_grad(lambda p: batch_loss(graphdef, p, batch, rng))(params)
    else:
        opt = dp_optimizer(optax.adam(1e-4), l2_clip=1.0, noise_multiplier=1.0, expected_batch_size=size["batch"],
                           key=0)
        uncertified = options.pop("uncertified", False)

        old_routes = options.pop("old_routes", False)
        clipped = clipped_grad(lambda p, ex, r: per_example_loss(graphdef, p, ex, r), l2_clip=1.0, **options)

        def grads(params, batch, mask, rng):
            saved = ghost._norm_bound, ghost._owned_lookup, ghost._owned_conv
            ghost._norm_bound = _uncertified_norm if uncertified else ghost._norm_bound  # only while tracing
            if old_routes:
                ghost._owned_lookup = ghost._owned_conv = lambda eqn, owners: None
            try:
                grad_sum, aux = clipped(params, batch, mask, example_keys(rng, batch))
            finally:
                ghost._norm_bound, ghost._owned_lookup, ghost._owned_conv = saved
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
    step, opt = _step_fn(mode, graphdef, size)
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
    parser.add_argument("--model", default="transformer", choices=sorted(MODELS),
                        help="pixel_flow: the dp_diffusion baseline's U-Net")
    parser.add_argument("--out", default="/tmp/bench_dp_step.json")
    parser.add_argument("--worker", choices=["time", "memory"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    size_name = "quick" if args.quick else "full"
    modes = args.modes.split(",") if args.modes else (QUICK_MODES if args.quick else list(MODES))
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not (args.worker or "non_dp" in modes):
        parser.error(f"--modes takes names from {list(MODES)}, non_dp included (the baseline); unknown: {unknown}")
    rounds = args.rounds or (3 if args.quick else 5)
    size = MODELS[args.model][size_name]
    if args.worker == "time":
        print(json.dumps(time_worker(modes, size, rounds)))
        return
    if args.worker == "memory":
        print(json.dumps(memory_worker(modes[0], size)))
        return

    common = ["--rounds", str(rounds), "--model", args.model] + (["--quick"] if args.quick else [])
    timed = {mal: _worker(["--worker", "time", "--modes", ",".join(modes), *common], mal) for mal in MALLOC}
    rss = {mal: {m: _worker(["--worker", "memory", "--modes", m, *common], mal) for m in modes} for mal in MALLOC}
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
    for mal, r in rss.items():
        for m in modes:
            rows.append(
                {
                    "mode": m,
                    "malloc": mal,
                    **r[m],
                    "rss_growth_x": r[m]["rss_growth_mb"] / r["non_dp"]["rss_growth_mb"],
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
