"""The paper-scale benchmarks on tiny sizes: bench_paper_step's derived table and device_check's DP-step part."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.bench import bench_paper_step as paper
from experiments.bench import device_check

REPO = Path(__file__).resolve().parents[1]


def _row(mode: str, microbatch: int, total_gb: float, flops_per_example: float) -> dict:
    return {"mode": mode, "dtype": "bfloat16", "condition": "caption", "microbatch": microbatch, "args_gb": 4.0,
            "temp_gb": total_gb - 8.0, "total_gb": total_gb, "flops_per_example": flops_per_example,
            "compile_s": 1.0}


@pytest.mark.unit
def test_derived_table_fits_a_line_and_compares_with_the_non_dp_step():
    rows = [_row("non_dp", mb, 8.0 + mb, 1e12) for mb in (8, 16, 32)]
    rows += [_row("dp_ghost", mb, 8.0 + 1.5 * mb, 1.2e12) for mb in (8, 16, 32)]
    table = {(r["mode"], r["microbatch"]): r for r in paper.derive(rows, per_device=512, scanned=[])}
    ghost = table[("dp_ghost", 16)]
    assert ghost["mem_x"] == pytest.approx(32.0 / 24.0) and ghost["flop_x"] == pytest.approx(1.2)
    assert ghost["fit_80gb"] == 48 and table[("non_dp", 8)]["fit_80gb"] == 72  # (80 - 8) / 1.5, (80 - 8) / 1
    assert ghost["step_s_est"] == pytest.approx(1.2e12 * 512 / (0.4 * 989e12))


@pytest.mark.unit
def test_peak_flops_table():
    assert device_check.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert device_check.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert device_check.peak_flops("TPU v5 lite") == 197e12
    assert device_check.peak_flops("cpu") is None


@pytest.mark.integration
@pytest.mark.slow  # compiles the paper-shaped step twice: 30-70 s on 2 cores
def test_device_check_dp_step_worker_runs_the_quick_ghost_step():
    result = device_check.dp_step_worker({"mode": "dp_ghost", "depth": 1, "microbatch": 4, "chunks": 2,
                                          "dtype": "bfloat16", "repeats": 1, "quick": True,
                                          "blocks": "scanned"})
    one, two = result["runs"]
    assert (one["batch"], two["batch"]) == (4, 8)
    assert one["flops"] > 0 and two["step_s"] > 0 and result["mfu"] is None  # a CPU has no peak in the table
    assert result["step_flops"] == pytest.approx(2 * one["flops"])
    assert result["tokens_per_s"] == pytest.approx(8 * paper.QUICK["seq_len"] / two["step_s"])


@pytest.mark.unit
@pytest.mark.slow  # subprocesses: about a minute on 2 idle cores
def test_device_check_quick_dp_step_part_end_to_end(tmp_path):
    out = tmp_path / "check.json"
    cmd = [sys.executable, "-m", "experiments.bench.device_check", "--quick", "--parts", "dp_step", "--modes",
           "non_dp,dp_ghost", "--chunks", "2", "--repeats", "1", "--out", str(out)]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    part = json.loads(out.read_text())["parts"]["dp_step"]
    assert set(part["modes"]) == {"non_dp", "dp_ghost"} and part["ratios"]["dp_ghost"]["flops_x"] > 1


@pytest.mark.unit
def test_scanned_rows_compare_with_the_scanned_non_dp_step_and_leave_out_flops():
    rows = [{**_row(mode, 16, total, 1e12), "blocks": blocks, "compile_s": seconds}
            for blocks, seconds in (("unrolled", 10.0), ("scanned", 4.0))
            for mode, total in (("non_dp", 24.0), ("dp_ghost", 20.0))]
    rows[1]["compile_s"], rows[3]["compile_s"] = 70.0, 5.0  # the DP steps
    table = {(r["mode"], r["blocks"]): r for r in paper.derive(rows, per_device=512, scanned=[])}
    assert table[("dp_ghost", "unrolled")]["compile_x"] == pytest.approx(7.0)
    scanned = table[("dp_ghost", "scanned")]
    assert scanned["compile_x"] == pytest.approx(1.25) and scanned["mem_x"] == pytest.approx(20.0 / 24.0)
    assert scanned["gflop_ex"] is None and scanned["step_s_est"] is None  # XLA counts a scanned block once
