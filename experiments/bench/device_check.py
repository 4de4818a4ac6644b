"""What matters on an accelerator, measured in one run of under 10 minutes, written to one JSON.

    python -m experiments.bench.device_check --out experiments/bench/results/device_check_h100.json
    python -m experiments.bench.device_check --quick --out /tmp/device_check_cpu.json   # CPU, tiny sizes

Parts (`--parts`), each in subprocesses under its own time limit; a failure or timeout is recorded and the
other parts still run:
  dp_step  the DP step (ghost norms and materialized per-example gradients) and the non-DP step of the paper
           transformer (coco.py's: depth 24, width 1024, caption prefix, bfloat16) at the config's microbatch,
           each mode in a fresh process (its own peak memory). On out-of-memory or timeout the size steps down
           (microbatch, then depth) and every mode runs again at the smaller size, so ratios compare like with
           like. Per mode: compile time, XLA's memory analysis, the device's peak memory
           (`memory_stats()["peak_bytes_in_use"]`), the median time of a step over one microbatch and of a step
           over `--chunks` microbatches (DP: scanned, non-DP: one batch of the same examples), examples and
           tokens per second, and model FLOPs utilization (the one-microbatch step's FLOPs from XLA's cost
           analysis, times the chunks, over the device's bf16 peak from PEAK_FLOPS; null on an unknown device).
           `--blocks scanned` runs the transformer's blocks as one scan (`transformer.scan_blocks`; XLA's FLOPs
           then count one block: MFU is not comparable).
  smoke    `python -m dpwave.main` on coco.py:smoke and mm_celeba_hq.py:smoke (the fixture trees of
           tests/helpers/trees.py), side by side except on a TPU (one process per chip).
  tests    pytest -x -q over TESTS, on the device's platform (tests/conftest.py defaults to CPU otherwise).
The parent process never initializes the accelerator: a device held by it would be missing for the parts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
MODES = ("non_dp", "dp_ghost", "dp_vmap")
# bf16 dense peak FLOP/s by `device_kind` substring, first match wins (vendor data sheets).
PEAK_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12),
              ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v4", 275e12))
# (depth, microbatch) from the paper size down; --quick: QUICK_SIZES of bench_paper_step.QUICK's tiny model.
SIZES = ((24, 16), (24, 8), (12, 8), (6, 8), (2, 4))
QUICK_SIZES = ((1, 4),)
TESTS = ("tests/privacy/test_ghost.py", "tests/privacy/test_neighbouring_step.py", "tests/models/test_transformer.py",
         "tests/test_wavelets.py")
SMOKE_CONFIGS = ("coco", "mm_celeba_hq")
OOM = re.compile(r"RESOURCE_EXHAUSTED|[Oo]ut of memory")
TAIL = 2000


def peak_flops(device_kind: str) -> float | None:
    """The device's bf16 dense peak FLOP/s, None when PEAK_FLOPS does not know it."""
    return next((flops for name, flops in PEAK_FLOPS if name.lower() in device_kind.lower()), None)


def _median_step(compiled: Any, args: tuple, repeats: int) -> tuple[float, Any]:
    """The median time of `repeats` steps after a warm-up one, each from the state the previous one returned (the
    step donates its state), and the last state."""
    import jax

    state, rest = args[0], args[1:]
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        state, _ = jax.block_until_ready(compiled(state, *rest))
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]), state


def dp_step_worker(job: dict[str, Any]) -> dict[str, Any]:
    """One mode at one size on the first device: compile, run, time, peak memory (run in a fresh process)."""
    import jax
    from flax import nnx

    from dpwave.models import transformer as transformer_lib
    from dpwave.train import distributed
    from experiments.bench import bench_paper_step as paper

    device = jax.devices()[0]
    settings = paper.paper_settings()
    mesh = distributed.make_data_mesh([device])
    shrink = {**(paper.QUICK if job["quick"] else {}), "depth": job["depth"]}
    result: dict[str, Any] = {"runs": []}
    for chunks in (1, job["chunks"]):
        spec = paper.StepSpec(job["mode"], job["microbatch"], job["microbatch"] * chunks, job["dtype"],
                              blocks=job["blocks"])
        cfg = paper.model_config(settings, spec, shrink)
        step, init, _, _ = paper.build_step(settings, cfg, spec, mesh)
        if "params_m" not in result:
            params = nnx.split(transformer_lib.ARTransformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)[1]
            state = init(params)
            result["params_m"] = sum(p.size for p in jax.tree.leaves(params)) / 1e6
            result["tokens_per_example"] = cfg.seq_len
        args = paper.step_args(spec, cfg, state, jax.random.key(0))
        start = time.perf_counter()
        compiled = step.lower(*args).compile()
        compile_s = time.perf_counter() - start
        step_s, state = _median_step(compiled, args, job["repeats"])
        stats = device.memory_stats() or {}
        result["runs"].append({"chunks": chunks, "batch": spec.batch, "compile_s": compile_s, "step_s": step_s,
                               "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
                               "bytes_limit": stats.get("bytes_limit"), **paper.analyze(compiled)})
    one, many = result["runs"]
    # A DP step over several microbatches scans them, and XLA's cost analysis counts a scan body once: the
    # one-microbatch step's FLOPs times the chunks (its optimizer update, ~1e-4 of them, is counted each time).
    flops = one["flops"] * job["chunks"] if job["mode"] != "non_dp" else many["flops"]
    peak = peak_flops(device.device_kind)
    result.update(step_flops=flops, examples_per_s=many["batch"] / many["step_s"],
                  tokens_per_s=many["batch"] * result["tokens_per_example"] / many["step_s"],
                  mfu=flops / many["step_s"] / peak if peak else None,
                  peak_gb=max((r["peak_bytes_in_use"] or 0) for r in result["runs"]) / 1e9 or None)
    return result


def info_worker() -> dict[str, Any]:
    """The devices as JAX sees them (run in a subprocess, so the parent never holds the accelerator)."""
    import jax

    device = jax.devices()[0]
    return {"platform": device.platform, "device_kind": device.device_kind, "count": jax.device_count(),
            "jax": jax.__version__, "peak_bf16_flops": peak_flops(device.device_kind),
            "memory_limit_bytes": (device.memory_stats() or {}).get("bytes_limit")}


def _run(cmd: list[str], timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Runs `cmd` in the repository root; rc (None on timeout), wall seconds, stdout and the tails of stderr."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    try:
        out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=max(timeout, 1))
        rc, stdout, stderr = out.returncode, out.stdout, out.stderr
    except subprocess.TimeoutExpired as e:
        rc = None
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr = e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or "")
    return {"rc": rc, "wall_s": time.perf_counter() - start, "timed_out": rc is None, "stdout": stdout,
            "stderr_tail": stderr[-TAIL:]}


def _worker(kind: str, payload: dict[str, Any], timeout: float, env: dict[str, str]) -> dict[str, Any]:
    """Runs this module's `--worker kind` in a fresh process; its JSON result or the failure."""
    run = _run([sys.executable, "-m", "experiments.bench.device_check", "--worker", kind, json.dumps(payload)],
               timeout, env)
    lines = run.pop("stdout").strip().splitlines()
    if run["rc"] == 0 and lines:
        return {**json.loads(lines[-1]), "wall_s": run["wall_s"]}
    return {"error": "timeout" if run["timed_out"] else ("oom" if OOM.search(run["stderr_tail"]) else "failed"),
            **run}


def part_dp_step(args: argparse.Namespace, deadline: float) -> dict[str, Any]:
    """The DP and non-DP steps at the largest size of SIZES (QUICK_SIZES) at which every mode runs."""
    env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")}
    attempts = []
    for depth, microbatch in QUICK_SIZES if args.quick else SIZES:
        size = {"depth": depth, "microbatch": microbatch, "chunks": args.chunks, "dtype": "bfloat16",
                "repeats": args.repeats, "quick": args.quick, "blocks": args.blocks}
        modes = {}
        for mode in args.modes:
            left = deadline - time.time()
            if left < 10:
                modes[mode] = {"error": "part time limit reached"}
                break
            modes[mode] = _worker("dp_step", {**size, "mode": mode}, left, env)
            print(f"  dp_step depth {depth} microbatch {microbatch} {mode}: "
                  f"{modes[mode].get('error') or 'ok'} ({modes[mode]['wall_s']:.0f} s)"
                  if "wall_s" in modes[mode] else f"  {mode}: {modes[mode]['error']}", flush=True)
            if "error" in modes[mode]:
                break
        attempts.append({**size, "modes": modes})
        if all("error" not in m for m in modes.values()) and len(modes) == len(args.modes):
            return {"size": size, "modes": modes, "ratios": _ratios(modes), "attempts": attempts[:-1], "env": env}
        if time.time() > deadline - 10:
            break
    return {"error": "no size ran in every mode within the time limit", "attempts": attempts, "env": env}


def _ratios(modes: dict[str, dict]) -> dict[str, dict[str, float | None]]:
    """Each DP mode against the non-DP step: step time, device peak memory, FLOPs, XLA temporaries (one
    microbatch each)."""
    if "non_dp" not in modes:
        return {}
    base = modes["non_dp"]
    ratio = lambda a, b: a / b if a and b else None
    return {m: {"step_time_x": ratio(r["runs"][-1]["step_s"], base["runs"][-1]["step_s"]),
                "peak_memory_x": ratio(r["peak_gb"], base["peak_gb"]),
                "flops_x": ratio(r["step_flops"], base["step_flops"]),
                "xla_temp_x_one_microbatch": ratio(r["runs"][0]["temp_gb"], base["runs"][0]["temp_gb"])}
            for m, r in modes.items() if m != "non_dp"}


def part_smoke(args: argparse.Namespace, deadline: float, platform_name: str) -> dict[str, Any]:
    """The `:smoke` pipeline of both paper configs through `python -m dpwave.main`."""
    sys.path.insert(0, str(REPO / "tests"))
    from helpers.trees import smoke_args, write_smoke_tree

    root = Path(tempfile.mkdtemp(prefix="device_check_smoke_"))
    env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "JAX_PLATFORMS": platform_name}
    commands = {}
    for name in SMOKE_CONFIGS:
        raw = write_smoke_tree(name, root / name / "raw")
        commands[name] = [sys.executable, "-m", "dpwave.main", f"--config={smoke_args(name, raw)}",
                          f"--workdir={root / name / 'run'}"]
    if platform_name == "tpu":  # one process per TPU chip: one after the other
        runs = {name: _run(cmd, deadline - time.time(), env) for name, cmd in commands.items()}
    else:
        start = time.perf_counter()
        procs = {name: subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), **env},
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for name, cmd in commands.items()}
        runs = {}
        for name, proc in procs.items():
            try:
                _, stderr = proc.communicate(timeout=max(deadline - time.time(), 1))
                runs[name] = {"rc": proc.returncode, "timed_out": False, "stderr_tail": stderr[-TAIL:]}
            except subprocess.TimeoutExpired:
                proc.kill()
                runs[name] = {"rc": None, "timed_out": True, "stderr_tail": proc.communicate()[1][-TAIL:]}
            runs[name]["wall_s"] = time.perf_counter() - start
    for name, run in runs.items():
        run.pop("stdout", None)
        workdir = root / name / "run"
        run["stages_done"] = sorted(p.parent.name for p in workdir.glob("*/summary.json"))
        metrics = workdir / "metrics.json"
        if metrics.exists():
            values = json.loads(metrics.read_text())
            run["metrics"] = {k: values.get(k) for k in ("epsilon", "fd_cls", "precision", "recall")}
        run["ok"] = run["rc"] == 0 and metrics.exists()
        if run["ok"]:
            run.pop("stderr_tail")
    return {"root": str(root), "runs": runs, "ok": all(r["ok"] for r in runs.values())}


def part_tests(args: argparse.Namespace, deadline: float, platform_name: str) -> dict[str, Any]:
    """pytest -x -q over TESTS on the device's platform."""
    run = _run([sys.executable, "-m", "pytest", "-x", "-q", *TESTS], deadline - time.time(),
               {"JAX_PLATFORMS": platform_name})
    stdout = run.pop("stdout")
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|errors?|skipped)", stdout.splitlines()[-1]
                                                if stdout.strip() else "")}
    ok = run["rc"] == 0
    return {"files": list(TESTS), "counts": counts, "ok": ok, **run,
            **({} if ok else {"stdout_tail": stdout[-TAIL:]})}


def _summary(record: dict[str, Any]) -> None:
    device = record["device"]
    print(f"\ndevice: {device.get('device_kind')} ({device.get('platform')}), {record['wall_s']:.0f} s in all")
    dp = record["parts"].get("dp_step", {})
    if "modes" in dp:
        size = dp["size"]
        print(f"dp_step at depth {size['depth']}, microbatch {size['microbatch']} x {size['chunks']} chunks:")
        for mode, r in dp["modes"].items():
            mfu = f"{r['mfu']:.3f}" if r.get("mfu") is not None else "null"
            print(f"  {mode:8s} step {r['runs'][-1]['step_s'] * 1e3:9.2f} ms  {r['tokens_per_s']:12.0f} tokens/s  "
                  f"MFU {mfu}  peak {r['peak_gb']} GB  compile {r['runs'][0]['compile_s']:.1f} s")
        for mode, ratio in dp["ratios"].items():
            print(f"  {mode} / non_dp: " + ", ".join(f"{k} {v:.3g}" if v is not None else f"{k} null"
                                                     for k, v in ratio.items()))
    for name, part in record["parts"].items():
        status = part.get("error") or ("timeout" if part.get("timed_out") else
                                       "ok" if part.get("ok", "modes" in part) else "FAILED")
        print(f"{name}: {status} ({part.get('wall_s', 0):.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="default experiments/bench/results/device_check_<device>.json")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the script on a CPU")
    parser.add_argument("--parts", default="dp_step,smoke,tests", help="comma-separated subset of the parts")
    parser.add_argument("--modes", default=",".join(MODES), help=f"dp_step modes, a subset of {MODES}")
    parser.add_argument("--chunks", type=int, default=4, help="microbatches per timed step")
    parser.add_argument("--blocks", default="unrolled", choices=("unrolled", "scanned"),
                        help="the transformer's blocks: unrolled (the paper config) or scanned "
                        "(transformer.scan_blocks)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per measurement (median)")
    parser.add_argument("--limits", default="300,150,120",
                        help="seconds for dp_step, smoke, tests (each part stops there; the others still run)")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, payload = args.worker
        print(json.dumps(dp_step_worker(json.loads(payload)) if kind == "dp_step" else info_worker()))
        return
    args.modes = args.modes.split(",")
    parts = args.parts.split(",")
    unknown = sorted(set(parts) - {"dp_step", "smoke", "tests"}) + sorted(set(args.modes) - set(MODES))
    if unknown:
        parser.error(f"unknown parts or modes: {unknown}")
    limits = dict(zip(("dp_step", "smoke", "tests"), (float(s) for s in args.limits.split(","))))
    start = time.time()
    device = _worker("info", {}, 120, {})
    platform_name = {"gpu": "cuda"}.get(device.get("platform"), device.get("platform") or "cpu")
    record: dict[str, Any] = {"benchmark": "device_check", "quick": args.quick, "device": device,
                              "host": {"platform": platform.platform(), "cpus": os.cpu_count()}, "parts": {}}
    for name in parts:
        part_start = time.time()
        print(f"{name} (limit {limits[name]:.0f} s)", flush=True)
        try:
            if name == "dp_step":
                result = part_dp_step(args, part_start + limits[name])
            elif name == "smoke":
                result = part_smoke(args, part_start + limits[name], platform_name)
            else:
                result = part_tests(args, part_start + limits[name], platform_name)
        except Exception as e:  # one part's failure is recorded; the others still run
            result = {"error": f"{type(e).__name__}: {e}"}
        record["parts"][name] = {**result, "wall_s": time.time() - part_start}
    record["wall_s"] = time.time() - start
    kind = re.sub(r"[^a-z0-9]+", "_", str(device.get("device_kind", "unknown")).lower()).strip("_")
    out = Path(args.out or REPO / "experiments" / "bench" / "results" / f"device_check_{kind}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1, default=str) + "\n")
    _summary(record)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
