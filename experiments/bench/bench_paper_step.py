"""The paper's 0.3B DP step compiled on CPU, never run: XLA's memory and FLOPs, compile time, a per-device table.

    python -m experiments.bench.bench_paper_step --out experiments/bench/results/bench_paper_step.json
    python -m experiments.bench.bench_paper_step --quick    # a tiny model (QUICK): seconds (the test runs it)

Model: `settings.read(experiments/configs/coco.py).dp_transformer` (mm_celeba_hq.py builds the same one): width
1024, depth 24, 16 heads, MLP 4096, 256 coarse tokens (vocabulary 4096) after a caption prefix of 128 bytes
read by a 2-block text encoder; activations float32 or bfloat16 (`TransformerConfig.dtype`; the paper config
sets bfloat16); the 24 decoder blocks `unrolled` (the paper config) or `scanned` (one `jax.lax.scan` over stacked
weights: `transformer.scan_blocks`), `--blocks`. `--label` adds the same model label-conditioned (no prefix) at
microbatch 16, for comparison with the issue's first measurement.

Steps, built as the pipeline builds them on a one-device data mesh (the per-device program of the 8-device run):
  dp_vmap, dp_ghost  the DP stage's step (`DpSgdMechanism.clipped_sum` -> `steps.dp_step`;
                     DP-Adam of the config's recipe), materialized per-example gradients
                     or ghost norms, over one microbatch per device (no microbatch scan: XLA's cost analysis counts a
                     scan or while body once, so only a scan-free step gives every FLOP: the FLOP columns are
                     the unrolled rows');
  non_dp             `steps.public_step` with the same model and inner optimizer, over the same examples.
Parameters, optimizer state and batch are abstract (`jax.eval_shape`, `ShapeDtypeStruct`): nothing of size
0.3B is allocated. `scan` rows compile the DP step over the expected per-device batch (4096 / 8 = 512
examples, 512 / microbatch scanned microbatches; bfloat16) to show what the scan adds to the memory.

Derived (estimates): per-device memory = arguments + outputs + temporaries - aliased (the step donates its state,
so the new state reuses the old one's buffers); the largest microbatch within 80 GB (and within the 75% that JAX
preallocates on a GPU by default), from a straight-line fit of memory over microbatches 8/16/32; the step time at
40% of H100 bf16 dense peak (989 TFLOP/s) for the expected batch over 8 devices, from the FLOPs per example.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dpwave.models import transformer as transformer_lib
from dpwave.train import distributed, dp_recipe, steps
from dpwave.train import settings as settings_lib
from dpwave.train.stages.dp_finetune import init_state
from experiments.bench.common import print_table, write_json
from experiments.configs import coco

MODES = ("non_dp", "dp_vmap", "dp_ghost")
H100_BF16_FLOPS = 989e12  # dense, SXM
UTILIZATION = 0.4
DEVICES = 8
DEVICE_BYTES = 80e9
PREALLOCATED = 0.75  # XLA_PYTHON_CLIENT_MEM_FRACTION default
COCO_TRAIN_SIZE = 118_287  # the private split's size: sets q and sigma, not the step's shape
GB = 1e9
QUICK = dict(depth=1, width=32, num_heads=2, mlp_dim=64, text_depth=1, max_text_len=8, seq_len=16, vocab_size=64)


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """One compiled step: `mode` over `batch` examples per device, `microbatch` at a time (DP)."""

    mode: str
    microbatch: int
    batch: int
    dtype: str
    condition: str = "caption"
    blocks: str = "unrolled"

    @property
    def dp(self) -> bool:
        return self.mode != "non_dp"


def paper_settings() -> settings_lib.Settings:
    """The settings of `experiments/configs/coco.py` (method dpwave, epsilon 1)."""
    return settings_lib.read(coco.get_config("manual_dir=/raw"))


def model_config(settings: settings_lib.Settings, spec: StepSpec, shrink: dict[str, int] | None = None
                 ) -> transformer_lib.TransformerConfig:
    """The DP stage's transformer with `spec`'s activation dtype, condition and blocks, and `shrink`'s sizes."""
    cfg = dataclasses.replace(settings.dp_transformer, dtype=spec.dtype, scan_blocks=spec.blocks == "scanned",
                              **(shrink or {}))
    if spec.condition == "label":
        cfg = dataclasses.replace(cfg, max_text_len=0, num_classes=10)
    return cfg


def example_batch(cfg: transformer_lib.TransformerConfig, n: int, key: jax.Array | None = None) -> dict[str, Any]:
    """n examples as the DP stage feeds them: abstract without `key`, random int32 arrays with it."""
    shapes = {"tokens": ((n, cfg.seq_len), cfg.vocab_size)}
    if cfg.conditioning == "text":
        shapes["caption_bytes"] = ((n, cfg.max_text_len), 256)
    elif cfg.conditioning == "class":
        shapes["label"] = ((n,), cfg.num_classes)
    if key is None:
        return {k: jax.ShapeDtypeStruct(shape, jnp.int32) for k, (shape, _) in shapes.items()}
    keys = jax.random.split(key, len(shapes))
    return {name: jax.random.randint(k, shape, 0, high, jnp.int32)
            for k, (name, (shape, high)) in zip(keys, shapes.items())}


def build_step(settings: settings_lib.Settings, cfg: transformer_lib.TransformerConfig, spec: StepSpec,
               mesh: jax.sharding.Mesh) -> tuple[Callable, Callable[[Any], steps.TrainState], nnx.GraphDef, Any]:
    """(jitted step, init(params) -> TrainState, graphdef, abstract params). The DP step is called as
    `step(state, batch, mask, key, index)`, the non-DP one as `step(state, batch, key)`."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: transformer_lib.ARTransformer(cfg, rngs=nnx.Rngs(0))),
                                 nnx.Param)
    recipe, mech = settings.dp.recipe, settings.dp.mechanism
    inner = dp_recipe.inner_optimizer(recipe, mech.steps)
    if not spec.dp:
        def loss_fn(p, batch, rng):
            return transformer_lib.batch_loss(graphdef, p, batch, rng), {}

        return (steps.public_step(loss_fn, inner, mesh), lambda p: steps.TrainState(p, inner.init(p)),
                graphdef, params)
    mechanism = mech.build(COCO_TRAIN_SIZE)
    optimizer = mechanism.optimizer(inner, 0)
    trainable = transformer_lib.trainable_mask(params, recipe.trainable)

    def example_loss(p, example, key):
        return transformer_lib.per_example_loss(graphdef, p, example, key)

    clipped_sum = mechanism.clipped_sum(example_loss, microbatch_size=spec.microbatch, trainable=trainable,
                                        use_ghost_norms=spec.mode == "dp_ghost")
    step = steps.dp_step(clipped_sum, optimizer, mesh, trainable=trainable, ema_decay=recipe.ema_decay)
    return (step,
            lambda p: init_state(p, trainable, optimizer, bool(recipe.ema_decay)), graphdef, params)


def step_args(spec: StepSpec, cfg: transformer_lib.TransformerConfig, state: Any, key: jax.Array | None = None
              ) -> tuple[Any, ...]:
    """The step's arguments after `state`: abstract without `key`, concrete with it."""
    batch = example_batch(cfg, spec.batch, key)
    rng = jax.eval_shape(lambda: jax.random.key(0)) if key is None else jax.random.fold_in(key, 1)
    if not spec.dp:
        return state, batch, rng
    if key is None:
        return state, batch, jax.ShapeDtypeStruct((spec.batch,), jnp.float32), rng, jax.ShapeDtypeStruct((), jnp.int32)
    return state, batch, jnp.ones((spec.batch,), jnp.float32), rng, jnp.int32(0)


def analyze(compiled: Any) -> dict[str, float]:
    """XLA's memory (GB) and FLOPs of a compiled step."""
    m = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"args_gb": m.argument_size_in_bytes / GB, "out_gb": m.output_size_in_bytes / GB,
            "temp_gb": m.temp_size_in_bytes / GB, "alias_gb": m.alias_size_in_bytes / GB,
            "total_gb": (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                         - m.alias_size_in_bytes) / GB,
            "flops": float(cost.get("flops", float("nan")))}


def compile_row(settings: settings_lib.Settings, spec: StepSpec, mesh: jax.sharding.Mesh,
                shrink: dict[str, int] | None) -> dict[str, Any]:
    """Lowers and compiles one step on abstract inputs; its analysis, timings and parameter count."""
    cfg = model_config(settings, spec, shrink)
    step, init, _, params = build_step(settings, cfg, spec, mesh)
    state = jax.eval_shape(init, params)
    start = time.perf_counter()
    lowered = step.lower(*step_args(spec, cfg, state))
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    done = time.perf_counter()
    row = {**dataclasses.asdict(spec), "params_m": sum(math.prod(p.shape) for p in jax.tree.leaves(params)) / 1e6,
           **analyze(compiled), "lower_s": lowered_at - start, "compile_s": done - lowered_at}
    row["flops_per_example"] = row["flops"] / spec.batch
    print(f"  {spec.mode:8s} {spec.blocks:8s} {spec.dtype:8s} {spec.condition:7s} mb {spec.microbatch:3d} "
          f"batch {spec.batch:4d}: "
          f"temp {row['temp_gb']:.2f} GB, total {row['total_gb']:.2f} GB, {row['flops_per_example']:.3g} FLOP/ex, "
          f"compile {row['compile_s']:.1f} s", flush=True)
    return row


def largest_fit(rows: list[dict[str, Any]], budget: float) -> int | None:
    """The largest microbatch whose per-device memory, on the least-squares line through `rows`' (microbatch,
    total_gb), stays within `budget` GB; None if not even 1 does. The fit is exact rational arithmetic on the
    given floats, so the floor is the same on every machine (a LAPACK fit's slope of 0.99999... floors 72 to 71)."""
    xs = [Fraction(r["microbatch"]) for r in rows]
    ys = [Fraction(r["total_gb"]) for r in rows]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = (sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys))
             / sum((x - mean_x) ** 2 for x in xs))
    intercept = mean_y - slope * mean_x
    if intercept + slope > Fraction(budget):
        return None
    return int((Fraction(budget) - intercept) // slope) if slope > 0 else None


def derive(rows: list[dict[str, Any]], per_device: int, scanned: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-device table: for each (mode, blocks, dtype, condition), memory at each microbatch, DP / non-DP
    ratios (of memory, FLOPs and compile time), the largest microbatch within 80 GB, and the estimated step time
    for the expected batch on 8 devices (FLOPs: unrolled rows only, XLA counts a scanned block once)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["mode"], r.get("blocks", "unrolled"), r["dtype"], r["condition"]), []).append(r)
    base = {(r.get("blocks", "unrolled"), r["dtype"], r["condition"], r["microbatch"]): r
            for r in rows if r["mode"] == "non_dp"}
    extra = {(r["mode"], r["dtype"], r["condition"]): r["total_gb"] - r["ref_total_gb"] for r in scanned}
    table = []
    for (mode, blocks, dtype, condition), group in groups.items():
        counted = blocks == "unrolled"
        for r in sorted(group, key=lambda r: r["microbatch"]):
            ref = base.get((blocks, dtype, condition, r["microbatch"]))
            table.append({
                "mode": mode, "blocks": blocks, "dtype": dtype, "condition": condition, "microbatch": r["microbatch"],
                "state_gb": r["args_gb"], "temp_gb": r["temp_gb"], "total_gb": r["total_gb"],
                "mem_x": r["total_gb"] / ref["total_gb"] if ref else None,
                "temp_x": r["temp_gb"] / ref["temp_gb"] if ref else None,
                "gflop_ex": r["flops_per_example"] / 1e9 if counted else None,
                "flop_x": r["flops_per_example"] / ref["flops_per_example"] if ref and counted else None,
                "fit_80gb": largest_fit(group, DEVICE_BYTES / GB - extra.get((mode, dtype, condition), 0.0))
                if len(group) > 1 else None,
                "fit_60gb": largest_fit(group, PREALLOCATED * DEVICE_BYTES / GB
                                        - extra.get((mode, dtype, condition), 0.0)) if len(group) > 1 else None,
                "step_s_est": r["flops_per_example"] * per_device / (UTILIZATION * H100_BF16_FLOPS)
                if counted else None,
                "compile_s": r["compile_s"],
                "compile_x": r["compile_s"] / ref["compile_s"] if ref else None,
            })
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"a tiny model {QUICK}, microbatch 8, bfloat16")
    parser.add_argument("--microbatches", default="8,16,32", help="comma-separated microbatch sizes")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated activation dtypes")
    parser.add_argument("--blocks", default="unrolled,scanned", help="comma-separated: unrolled (the paper config; "
                        "every FLOP counted), scanned (transformer.scan_blocks)")
    parser.add_argument("--no-scan", action="store_true", help="skip the scanned steps over the per-device batch")
    parser.add_argument("--label", action="store_true", help="also the label-conditioned model at microbatch 16")
    parser.add_argument("--out", default="/tmp/bench_paper_step.json")
    args = parser.parse_args()
    settings = paper_settings()
    mesh = distributed.make_data_mesh(jax.devices()[:1])
    shrink = QUICK if args.quick else None
    microbatches = (8,) if args.quick else tuple(int(m) for m in args.microbatches.split(","))
    dtypes = ("bfloat16",) if args.quick else tuple(args.dtypes.split(","))
    per_device = settings.dp.mechanism.expected_batch_size // DEVICES
    blocks = tuple(args.blocks.split(","))
    specs = [StepSpec(m, mb, mb, dt, blocks=b) for b in blocks for dt in dtypes for mb in microbatches for m in MODES]
    if args.label:
        specs += [StepSpec(m, 16, 16, dt, "label", blocks[0]) for dt in dtypes for m in MODES]
    # The scanned DP step over the expected per-device batch at the config's microbatch (quick: 4 microbatches).
    scan_mb = microbatches[0] if args.quick else settings.perf.microbatch_size
    scan_batch = 4 * scan_mb if args.quick else per_device
    if not args.no_scan and scan_mb in microbatches and "bfloat16" in dtypes:
        specs += [StepSpec(m, scan_mb, scan_batch, "bfloat16", blocks=blocks[0]) for m in MODES[1:]]
    rows: list[dict[str, Any]] = []
    scanned: list[dict[str, Any]] = []
    extra = dict(quick=args.quick, shrink=shrink, per_device_batch=per_device, devices=DEVICES,
                 peak_flops=H100_BF16_FLOPS, utilization=UTILIZATION, device_bytes=DEVICE_BYTES,
                 units={"memory": "GB = 1e9 bytes", "flops": "per example"})
    for spec in specs:  # the record is rewritten after every compile: an interrupted sweep keeps its rows
        row = compile_row(settings, spec, mesh, shrink)
        if spec.batch == spec.microbatch:
            rows.append(row)
        else:
            ref = next(r for r in rows if (r["mode"], r["dtype"], r["microbatch"], r["condition"], r["blocks"])
                       == (spec.mode, spec.dtype, spec.microbatch, spec.condition, spec.blocks))
            row.update(ref_total_gb=ref["total_gb"], scan_flops_x=row["flops"] / ref["flops"])
            scanned.append(row)
        write_json(args.out, "paper_step", derive(rows, per_device, scanned), compiled=rows, scanned=scanned,
                   complete=spec == specs[-1], **extra)
    print_table(derive(rows, per_device, scanned))
    if scanned:
        print()
        print_table(scanned, ["mode", "blocks", "dtype", "microbatch", "batch", "temp_gb", "total_gb", "ref_total_gb",
                              "scan_flops_x", "compile_s"])


if __name__ == "__main__":
    main()
