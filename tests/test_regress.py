"""experiments/regress.py: the bit-for-bit comparison and its table (unit), and one real run against HEAD (slow)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import regress

REPO = Path(__file__).resolve().parents[1]


def _write_run(workdir: Path, digests: dict[str, dict[str, str]], metrics: dict) -> Path:
    for stage, summary in digests.items():
        (workdir / stage).mkdir(parents=True)
        (workdir / stage / "summary.json").write_text(json.dumps({"stage": stage, "inputs_sha256": "x" * 64,
                                                                  **summary}))
    (workdir / "metrics.json").write_text(json.dumps(metrics))
    return workdir


@pytest.mark.unit
def test_identical_is_bit_for_bit():
    assert regress.identical(0.3, 0.3) and regress.identical(math.nan, math.nan) and regress.identical(None, None)
    assert not regress.identical(0.1 + 0.2, 0.3)  # one ulp apart
    assert not regress.identical(-0.0, 0.0)
    assert not regress.identical(1, 1.0) and not regress.identical(True, 1)
    assert regress.identical("ab" * 32, "ab" * 32) and not regress.identical("ab" * 32, "ba" * 32)


@pytest.mark.unit
def test_flatten_keeps_numeric_leaves_with_dotted_keys():
    metrics = {"fd_cls": 33.6, "fid": None, "names": {"fd_cls": "FD-cls"}, "method": "dpwave",
               "ledger": {"events": [{"count": 12, "sigma": 0.43}], "ok": True}}
    assert regress.flatten(metrics) == {"fd_cls": 33.6, "fid": None, "ledger.events.0.count": 12,
                                        "ledger.events.0.sigma": 0.43, "ledger.ok": True}


@pytest.mark.unit
def test_collect_reads_stage_digests_in_finishing_order_then_metrics(tmp_path):
    run = _write_run(tmp_path, {"tokenizer": {"params_sha256": "a" * 64}, "sample": {"samples_sha256": "b" * 64},
                                "evaluate": {}}, {"epsilon": 9.9, "reasons": {"fid": "no weights"}})
    for i, stage in enumerate(("tokenizer", "sample", "evaluate")):  # finishing order, not alphabetical
        os.utime(run / stage / "summary.json", ns=(i * 10**9, i * 10**9))
    assert list(regress.collect(run).items()) == [
        ("tokenizer/params_sha256", "a" * 64), ("sample/samples_sha256", "b" * 64), ("epsilon", 9.9)]


@pytest.mark.unit
def test_compare_flags_differences_and_lists_absent_values_without_failing():
    against = {"tokenizer/params_sha256": "a" * 64, "fd_cls": 33.6, "old_metric": 1.0}
    working = {"tokenizer/params_sha256": "a" * 64, "fd_cls": 33.6, "new_metric": 0.5}
    rows = regress.compare(against, working)
    assert [(r.name, r.status) for r in rows] == [
        ("tokenizer/params_sha256", "equal"), ("fd_cls", "equal"), ("old_metric", "absent at working tree"),
        ("new_metric", "absent at against")]
    assert regress.exit_status(rows) == 0
    assert regress.summary_line(rows) == "all 2 values are bit-identical; 2 values are present on one side only"
    changed = regress.compare(against, {**working, "fd_cls": math.nextafter(33.6, 34.0)})
    assert [r.name for r in changed if r.status == regress.DIFFERENT] == ["fd_cls"]
    assert regress.exit_status(changed) == 1
    assert regress.summary_line(changed).startswith("1 of 2 values differ")


@pytest.mark.unit
def test_markdown_table_shortens_digests_and_prints_floats_exactly():
    rows = regress.compare({"dp_finetune/params_sha256": "0123456789abcdef" * 4, "fd_cls": 0.1 + 0.2},
                           {"dp_finetune/params_sha256": "fedcba9876543210" * 4, "fd_cls": 0.1 + 0.2})
    assert regress.markdown(rows, "HEAD = 967ba9e").splitlines() == [
        "| value | against (HEAD = 967ba9e) | working tree | equal? |", "|---|---|---|---|",
        "| dp_finetune/params_sha256 | 0123456789abcdef | fedcba9876543210 | DIFFERENT |",
        "| fd_cls | 0.30000000000000004 | 0.30000000000000004 | equal |"]


@pytest.mark.integration
def test_main_runs_both_checkouts_writes_the_table_and_removes_the_worktree(tmp_path, monkeypatch):
    sources = []

    def fake_run(source: Path, workdir: Path, config: str) -> float:
        sources.append(source)
        assert (source / "dpwave" / "main.py").exists() and config == regress.CONFIG
        metrics = {"epsilon": 9.9} if source == REPO else {"epsilon": 9.9, "dropped": 1.0}
        _write_run(workdir, {"tokenizer": {"params_sha256": "a" * 64}}, metrics)
        return 1.0

    monkeypatch.setattr(regress, "run_pipeline", fake_run)
    out = tmp_path / "out"
    assert regress.main(["--against=HEAD", f"--workdir={tmp_path / 'runs'}", f"--out={out}"]) == 0
    against, working = sources
    assert working == REPO and not against.exists()  # the worktree is gone
    assert str(against) not in subprocess.run(["git", "worktree", "list"], cwd=REPO, capture_output=True,
                                              text=True).stdout
    record = json.loads((out / "regress.json").read_text())
    assert [(r["name"], r["status"]) for r in record["rows"]] == [
        ("tokenizer/params_sha256", "equal"), ("epsilon", "equal"), ("dropped", "absent at working tree")]
    assert "| epsilon | 9.9 | 9.9 | equal |" in (out / "regress.md").read_text()
    # The same workdir again would skip finished stages: refused.
    assert regress.main(["--against=HEAD", f"--workdir={tmp_path / 'runs'}"]) == 2


@pytest.mark.unit
def test_unknown_revision_is_exit_status_2(capsys):
    assert regress.main(["--against=no-such-revision-xyz"]) == 2
    assert "regress:" in capsys.readouterr().err


@pytest.mark.e2e
@pytest.mark.slow  # two tiny pipelines, about 4 minutes each on 2 cores
def test_regress_against_head_runs_both_pipelines(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "experiments.regress", "--against=HEAD", f"--out={out}"],
                            cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert result.returncode in (0, 1), result.stderr[-3000:]
    rows = json.loads((out / "regress.json").read_text())["rows"]
    names = {r["name"] for r in rows}
    assert {f"{s}/params_sha256" for s in ("tokenizer", "pretrain", "dp_finetune", "refiner")} <= names
    assert {"sample/samples_sha256", "epsilon", "fd_cls"} <= names
    assert all(r["status"] in ("equal", "DIFFERENT") for r in rows)  # the same code computes the same values
    clean = not subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout
    if clean:  # HEAD against itself on one machine: every value bit-identical
        assert result.returncode == 0, result.stdout[-3000:]
