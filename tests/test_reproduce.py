"""experiments/reproduce.py: run plan, skipping, failures, aggregation, markdown, JSON, PNG, dry run."""
import json
import math
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from experiments import reproduce
from experiments.configs import tables
from experiments.configs.tables import get_table

REPO = Path(__file__).resolve().parents[1]
TINY = get_table("mnist_tiny")


def fake_metrics(seed: int, fd_cls: float | None, accuracy: float | None, epsilon: float = 1.0,
                 **extra) -> dict:
    """A metrics.json as the pipeline writes it (FID null without Inception weights)."""
    metrics = {"epsilon": epsilon, "delta": 1e-5, "fd_cls": fd_cls, "fd_lowpass": 2.0 + seed,
               "precision": 0.5 + seed / 10, "recall": 0.25, "cond_accuracy": 0.6 + seed / 10,
               "downstream_accuracy": accuracy, "memorization_ratio": 1.0 + seed,
               "fid": None, "dp_wall_time_s": 10.0 * (seed + 1), "dp_step_flops": 2e9, "dp_steps": 20,
               "method": "dpwave", "seed": seed,
               "reasons": {"fid": "no Inception weights (set eval.inception_weights)"}}
    metrics.update(extra)
    return metrics


def write_run(workdir: Path, label: str, seed: int, metrics: dict) -> None:
    run = workdir / label / f"seed{seed}"
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.json").write_text(json.dumps(metrics))


def row(label: str):
    return next(r for r in TINY if r.label == label)


def table_line(md: str, method: str, epsilon: str) -> list[str]:
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[:2] == [method, epsilon]:
            return cells
    raise AssertionError(f"no row {method} {epsilon} in\n{md}")


@pytest.mark.integration
def test_plan_appends_extra_args_and_seed_and_nests_workdirs(tmp_path):
    runs = reproduce.plan([row("full_dp_eps10")], tmp_path, [0, 3], "data_dir=/d")
    assert [r.workdir for r in runs] == [tmp_path / "full_dp_eps10" / f"seed{k}" for k in (0, 3)]
    assert runs[1].command == [sys.executable, "-m", "dpwave.main",
                               "--config=experiments/configs/mnist.py:tiny,method=full_dp,epsilon=10,"
                               "data_dir=/d,seed=3",
                               f"--workdir={tmp_path}/full_dp_eps10/seed3"]


@pytest.mark.integration
def test_execute_skips_finished_runs_and_reports_failures(tmp_path):
    runs = reproduce.plan([row("dpwave_eps1"), row("bicubic_epsinf")], tmp_path, [0, 1])
    write_run(tmp_path, "dpwave_eps1", 1, fake_metrics(1, 3.0, 0.9))
    calls = []

    def runner(command):  # the pipeline: succeeds for dpwave, crashes for bicubic seed 1
        calls.append(command)
        run = next(r for r in runs if r.command == command)
        if run.row.method == "bicubic" and run.seed == 1:
            return 3
        write_run(tmp_path, run.row.label, run.seed, fake_metrics(run.seed, 1.0, 0.5))
        return 0

    failed = reproduce.execute(runs, runner)
    assert calls == [runs[0].command, runs[2].command, runs[3].command]
    assert [(r.row.label, r.seed) for r in failed] == [("bicubic_epsinf", 1)]
    # A zero exit code without metrics.json is a failure too.
    assert reproduce.execute(runs[3:], lambda command: 0) == runs[3:]


@pytest.mark.integration
def test_summarize_mean_sample_std_and_nulls():
    stat = reproduce.summarize([1.0, None, 2.0, 6.0])
    assert (stat.mean, stat.n) == (3.0, 3)
    assert stat.std == pytest.approx(statistics.stdev([1.0, 2.0, 6.0]))
    assert reproduce.summarize([5.0]) == reproduce.Stat(5.0, None, 1)
    assert reproduce.summarize([None, None]) == reproduce.Stat(None, None, 0)
    assert reproduce.summarize([5.0]).format(str) == "5.0"
    assert reproduce.summarize([]).format(str) == "n/a"


@pytest.mark.integration
def test_controls_are_horizontal_lines_in_their_methods_colour(tmp_path):
    fd = {"dpwave_eps1": 30.0, "dpwave_eps10": 20.0, "dpwave_epsinf": 10.0, "dpwave_public": 40.0,
          "full_dp_eps1": 90.0, "full_dp_public": 80.0}
    for label, value in fd.items():
        for seed in (0, 1):
            write_run(tmp_path, label, seed, fake_metrics(seed, value + seed, 0.5))
    fig = reproduce.figure("t", reproduce.aggregate(TINY, reproduce.plan(TINY, tmp_path, [0, 1])))
    ax = fig.axes[0]
    assert ax.get_title() == "FD-cls (surrogate, not FID)"
    [(dp_x, dp_y, dp_colour), (_, full_y, full_colour)] = [
        (list(line.get_xdata()), list(line.get_ydata()), line.get_color()) for line in ax.get_lines()
        if line.get_linestyle() == "-" and line.get_marker() == "o"]
    assert (dp_x, dp_y) == ([1.0, 10.0], [30.5, 20.5]) and full_y == [90.5]  # controls are not on the ε axis
    controls = {(line.get_color(), line.get_linestyle(), line.get_ydata()[0]) for line in ax.get_lines()
                if line.get_linestyle() in ("--", ":")}
    assert controls == {(dp_colour, "--", 10.5), (dp_colour, ":", 40.5), (full_colour, ":", 80.5)}
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "10"]
    [legend] = fig.legends  # one legend below the panels, each entry once, none inside a panel
    assert [t.get_text() for t in legend.get_texts()] == [
        "dpwave", "full_dp", "dpwave: ε = ∞ (no noise)", "dpwave: public only (no DP stage)",
        "full_dp: public only (no DP stage)"]
    assert all(a.get_legend() is None for a in fig.axes)


@pytest.mark.integration
def test_main_aggregates_fake_runs_into_markdown_json_and_png(tmp_path):
    fd = {"dpwave_eps1": [4.0, 6.0], "full_dp_eps1": [9.0, 12.0], "dpwave_epsinf": [1.0, 2.0],
          "full_dp_epsinf": [1.5, 2.5], "bicubic_eps10": [7.0, 8.0]}
    for label, values in fd.items():
        eps = math.inf if label.endswith("inf") else 1.0
        for seed, value in enumerate(values):
            write_run(tmp_path, label, seed, fake_metrics(seed, value, 0.8 + seed / 10, epsilon=eps))
    write_run(tmp_path, "dpwave_eps10", 0, fake_metrics(0, None, 0.9, epsilon=9.5,
                                                        reasons={"fd_cls": "classifier diverged"}))

    def runner(command):
        raise AssertionError(f"only finished runs were selected, but {command} ran")

    code = reproduce.main(["--table", "mnist_tiny", "--workdir", str(tmp_path), "--seeds", "0,1",
                           "--rows", ",".join(fd)], runner=runner)
    assert code == 0
    md = (tmp_path / "mnist_tiny.md").read_text()
    header = [c.strip() for c in md.splitlines()[2].strip("|").split("|")]
    assert header[:4] == ["method", "ε target", "ε spent", "FD-cls (surrogate, not FID)"]
    assert "FID" not in header and header[-1] == "seeds"
    cells = dict(zip(header, table_line(md, "dpwave", "1")))
    assert cells["FD-cls (surrogate, not FID)"] == f"5 ± {statistics.stdev([4.0, 6.0]):.3g}"
    assert cells["downstream acc"] == f"0.850 ± {statistics.stdev([0.8, 0.9]):.3f}"
    assert cells["DP FLOPs/step"] == "2e+09 ± 0" and cells["seeds"] == "2/2"
    inf_cells = dict(zip(header, table_line(md, "full_dp", "inf")))
    assert inf_cells["ε spent"] == "inf" and inf_cells["FD-cls (surrogate, not FID)"] == "2 ± 0.707"
    # A row with one seed: no std; null FD-cls with its reason; rows never run are listed as 0/2.
    one = dict(zip(header, table_line(md, "dpwave", "10")))
    assert (one["FD-cls (surrogate, not FID)"], one["ε spent"], one["seeds"]) == ("n/a", "9.5", "1/2")
    assert "- fd_cls: classifier diverged" in md
    assert "- fid: no Inception weights (set eval.inception_weights)" in md
    assert cells["FD-lowpass (shape)"] == f"2.5 ± {statistics.stdev([2.0, 3.0]):.3g}"
    assert cells["cond acc"] == f"0.650 ± {statistics.stdev([0.6, 0.7]):.3f}"
    assert table_line(md, "bicubic", "1")[2:] == ["—"] * 10 + ["0/2"]
    assert len([line for line in md.splitlines() if line.startswith("| ")]) == 1 + len(TINY)

    record = json.loads((tmp_path / "mnist_tiny.json").read_text())
    by_label = {r["label"]: r for r in record["rows"]}
    assert by_label["full_dp_eps1"]["metrics"]["fd_cls"] == {
        "mean": 10.5, "std": pytest.approx(statistics.stdev([9.0, 12.0])), "n": 2}
    assert by_label["dpwave_epsinf"]["metrics"]["epsilon"]["mean"] == "inf"
    assert by_label["bicubic_eps1"]["seeds_done"] == 0

    image = np.asarray(Image.open(tmp_path / "mnist_tiny.png").convert("RGB"))
    assert image.shape == (500, 2000, 3)  # FD-cls, FD-lowpass, downstream acc, cond acc
    for panel in np.split(image, 4, axis=1):  # every panel drew coloured lines, not only axes
        colourful = np.ptp(panel.astype(int), axis=-1) > 60
        assert colourful.sum() > 200


@pytest.mark.integration
def test_fid_column_and_panel_appear_when_measured(tmp_path):
    write_run(tmp_path, "dpwave_eps1", 0, fake_metrics(0, 1.0, None, fid=33.27, reasons={}))
    results = reproduce.aggregate(TINY, reproduce.plan(TINY, tmp_path, [0]))
    md_path, _, png_path = reproduce.write_outputs("t", results, tmp_path)
    md = md_path.read_text()
    assert "| FID |" in md
    assert "33.3" in table_line(md, "dpwave", "1")
    assert Image.open(png_path).size == (2500, 500)  # FID and the four PLOTTED panels


@pytest.mark.integration
def test_runs_from_before_a_metric_existed_show_a_dash(tmp_path):
    old = fake_metrics(0, 4.0, 0.9)
    del old["fd_lowpass"], old["cond_accuracy"]
    write_run(tmp_path, "dpwave_eps1", 0, old)
    write_run(tmp_path, "full_dp_eps1", 0, fake_metrics(0, 9.0, 0.5))
    results = reproduce.aggregate(TINY, reproduce.plan(TINY, tmp_path, [0]))
    md_path, js_path, _ = reproduce.write_outputs("t", results, tmp_path)
    md = md_path.read_text()
    header = [c.strip() for c in md.splitlines()[2].strip("|").split("|")]
    old_cells, new_cells = (dict(zip(header, table_line(md, method, "1"))) for method in ("dpwave", "full_dp"))
    assert old_cells["FD-lowpass (shape)"] == old_cells["cond acc"] == "-"
    assert old_cells["FD-cls (surrogate, not FID)"] == "4"
    assert (new_cells["FD-lowpass (shape)"], new_cells["cond acc"]) == ("2", "0.600")
    assert "- not in the runs' metrics.json" in md
    by_label = {r["label"]: r for r in json.loads(js_path.read_text())["rows"]}
    assert by_label["dpwave_eps1"]["metrics"]["fd_lowpass"] == {"mean": None, "std": None, "n": 0}


@pytest.mark.integration
def test_bad_metrics_value_names_the_file(tmp_path):
    write_run(tmp_path, "dpwave_eps1", 0, fake_metrics(0, "oops", 0.9))
    with pytest.raises(ValueError, match=r"seed0/metrics.json: fd_cls='oops'"):
        reproduce.aggregate(TINY, reproduce.plan(TINY, tmp_path, [0]))


@pytest.mark.integration
def test_run_subprocess_runs_from_the_repository_root():
    code = "import os, experiments.configs.tables; assert os.path.isfile('experiments/reproduce.py')"
    assert reproduce.run_subprocess([sys.executable, "-c", code]) == 0
    assert reproduce.run_subprocess([sys.executable, "-c", "raise SystemExit(4)"]) == 4


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "experiments.reproduce", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.integration
def test_dry_run_prints_every_command_and_marks_finished_runs(tmp_path):
    write_run(tmp_path, "full_dp_epsinf", 1, fake_metrics(1, 1.0, 0.9))
    result = cli("--table", "mnist_tiny", "--workdir", str(tmp_path), "--seeds", "0,1",
                 "--rows", "full_dp_epsinf,dpwave_eps1", "--extra-args", "data_dir=/data", "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    expected = [("dpwave_eps1", "dpwave", "1", 0), ("dpwave_eps1", "dpwave", "1", 1),
                ("full_dp_epsinf", "full_dp", "inf", 0), ("full_dp_epsinf", "full_dp", "inf", 1)]
    assert len(lines) == 4
    for line, (label, method, eps, seed) in zip(lines, expected):
        finished = (label, seed) == ("full_dp_epsinf", 1)
        assert line.startswith("# finished: ") == finished
        assert shlex.split(line.removeprefix("# finished: ")) == [
            sys.executable, "-m", "dpwave.main",
            f"--config=experiments/configs/mnist.py:tiny,method={method},epsilon={eps},data_dir=/data,"
            f"seed={seed}", f"--workdir={tmp_path / label / f'seed{seed}'}"]
    assert not (tmp_path / "mnist_tiny.md").exists()


@pytest.mark.integration
@pytest.mark.parametrize("args, message", [
    (["--table", "nope"], "unknown table 'nope'"),
    (["--table", "mnist_tiny", "--rows", "dpwave_eps2"], "unknown rows ['dpwave_eps2']"),
    (["--table", "mnist_tiny", "--seeds", "0,x"], "expected integers"),
    (["--table", "mnist_tiny", "--extra-args", "manual_dir"], "expected key=value pairs"),
])
def test_cli_errors_name_the_bad_value(tmp_path, args, message):
    result = cli(*args, "--workdir", str(tmp_path), "--dry-run")
    assert result.returncode == 2 and message in result.stderr, result.stderr


# -- reuse of public stages between runs ------------------------------------------------------------
@pytest.mark.integration
def test_load_config_resolves_the_command_like_dpwave_main(tmp_path, monkeypatch):
    from experiments.configs import mnist

    monkeypatch.chdir(tmp_path)  # the config path is relative to the repository, not the cwd
    run = reproduce.plan([row("full_dp_eps1")], tmp_path, [2])[0]
    config = reproduce.load_config(run.command + ["--config.dp.mechanism.delta=1e-6"])
    expected = mnist.get_config("tiny,method=full_dp,epsilon=1,seed=2")
    with expected.unlocked():
        expected.dp.mechanism.delta = 1e-6
    assert config.is_locked and config.to_json_best_effort() == expected.to_json_best_effort()


def fake_pipeline(runs, trained: dict):
    """A runner that 'trains' every stage missing from the run's workdir: writes its summary.json with the
    inputs_sha256 the pipeline records and params_sha256 naming the run that trained it."""
    from dpwave.train import pipeline, settings

    def runner(command):
        run = next(r for r in runs if r.command == command)
        fps = pipeline.stage_fingerprints(settings.read(reproduce.load_config(command)))
        trained[run.row.label, run.seed] = [s for s in fps if not (run.workdir / s / "summary.json").exists()]
        for stage in trained[run.row.label, run.seed]:
            (run.workdir / stage).mkdir(parents=True, exist_ok=True)
            (run.workdir / stage / "summary.json").write_text(json.dumps(
                {"stage": stage, "inputs_sha256": fps[stage], "params_sha256": f"{run.row.label}/{run.seed}"}))
        write_run(run.workdir.parents[1], run.row.label, run.seed, fake_metrics(run.seed, 1.0, 0.5))
        return 0
    return runner


@pytest.mark.integration
def test_execute_copies_only_public_stages_with_equal_inputs(tmp_path, capsys):
    rows = [row("dpwave_eps1"), row("dpwave_eps10"), row("full_dp_eps10"), row("bicubic_eps1")]
    runs = reproduce.plan(rows, tmp_path, [0, 1])
    trained: dict = {}
    assert reproduce.execute(runs, fake_pipeline(runs, trained)) == []
    late = ["dp_finetune", "sample", "evaluate"]
    assert trained == {  # a different seed shares nothing; DP, sample and evaluate always run
        ("dpwave_eps1", 0): ["tokenizer", "pretrain", "dp_finetune", "refiner", "sample", "evaluate"],
        ("dpwave_eps1", 1): ["tokenizer", "pretrain", "dp_finetune", "refiner", "sample", "evaluate"],
        ("dpwave_eps10", 0): late, ("dpwave_eps10", 1): late,
        ("full_dp_eps10", 0): ["pretrain", *late], ("full_dp_eps10", 1): ["pretrain", *late],  # all scales
        ("bicubic_eps1", 0): late, ("bicubic_eps1", 1): late}
    copy = tmp_path / "full_dp_eps10" / "seed1" / "tokenizer"
    assert json.loads((copy / "summary.json").read_text())["params_sha256"] == "dpwave_eps1/1"
    assert json.loads((copy / "reused_from.json").read_text()) == {
        "source": str(tmp_path / "dpwave_eps1" / "seed1" / "tokenizer")}
    assert not list(tmp_path.rglob(".*.copying"))
    out = capsys.readouterr().out
    assert "reused pretrain from dpwave_eps1/seed0" in out and out.count("reused ") == 2 * (3 + 1 + 2)


@pytest.mark.integration
def test_reuse_needs_matching_consumed_stages_and_leaves_existing_dirs_alone(tmp_path):
    runs = reproduce.plan([row("dpwave_eps1"), row("dpwave_eps10")], tmp_path, [0])
    fake_pipeline(runs, {})(runs[0].command)
    target = runs[1].workdir
    # Its own tokenizer (same inputs, other parameters, e.g. trained on other hardware): the source's
    # pretrain was trained on another tokenizer and is not copied; an unfinished refiner resumes as is.
    fps = json.loads((runs[0].workdir / "tokenizer" / "summary.json").read_text())
    (target / "tokenizer").mkdir(parents=True)
    (target / "tokenizer" / "summary.json").write_text(json.dumps({**fps, "params_sha256": "other"}))
    (target / "refiner").mkdir()
    assert reproduce.reuse_public_stages(runs[1], [r.workdir for r in runs]) == []
    assert sorted(p.name for p in target.iterdir()) == ["refiner", "tokenizer"]
    assert not list((target / "refiner").iterdir())
    # With the same tokenizer parameters, pretrain is copied.
    (target / "tokenizer" / "summary.json").write_text(json.dumps(fps))
    assert reproduce.reuse_public_stages(runs[1], [r.workdir for r in runs]) == [("pretrain", runs[0].workdir)]


@pytest.mark.integration
def test_reuse_draws_on_runs_of_other_tables_in_the_workdir(tmp_path, capsys):
    earlier = reproduce.plan([row("dpwave_eps1")], tmp_path, [0])
    fake_pipeline(earlier, {})(earlier[0].command)  # finished by an earlier invocation (another table)
    runs = reproduce.plan([row("dpwave_eps10")], tmp_path, [0])
    trained: dict = {}
    code = reproduce.main(["--table", "mnist_tiny", "--workdir", str(tmp_path), "--rows", "dpwave_eps10"],
                          runner=fake_pipeline(runs, trained))
    assert code == 0 and trained[("dpwave_eps10", 0)] == ["dp_finetune", "sample", "evaluate"]
    assert "reused pretrain from dpwave_eps1/seed0" in capsys.readouterr().out


@pytest.mark.integration
def test_no_reuse_flag_trains_every_stage_in_every_run(tmp_path, capsys):
    runs = reproduce.plan([row("dpwave_eps1"), row("dpwave_eps10")], tmp_path, [0])
    trained: dict = {}
    code = reproduce.main(["--table", "mnist_tiny", "--workdir", str(tmp_path), "--rows", "dpwave_eps1,dpwave_eps10",
                           "--no-reuse"], runner=fake_pipeline(runs, trained))
    assert code == 0 and trained[("dpwave_eps10", 0)] == trained[("dpwave_eps1", 0)] == [
        "tokenizer", "pretrain", "dp_finetune", "refiner", "sample", "evaluate"]
    assert "reused" not in capsys.readouterr().out


# -- post-processing rows: one trained model, other sample settings ------------------------------------
@pytest.mark.integration
def test_a_post_processing_row_copies_the_trained_stages_but_the_secret_and_only_samples(tmp_path, capsys):
    source = row("dpwave_eps10")
    guided = tables.resample(source, guidance_scale=2.0)
    assert (guided.label, guided.setting_label) == ("dpwave_eps10_guidance2", "guidance_scale=2.0")
    runs = reproduce.plan([source, guided], tmp_path, [0])
    assert runs[1].command[-2:] == ["--config.sample.guidance_scale=2.0", f"--workdir={runs[1].workdir}"]
    trained: dict = {}
    runner = fake_pipeline(runs, trained)
    runner(runs[0].command)
    (runs[0].workdir / "dp_finetune" / "secret_seed.json").write_text("{}")
    assert reproduce.execute(runs, runner) == []
    assert trained[("dpwave_eps10_guidance2", 0)] == ["sample", "evaluate"]  # every trained stage copied
    copied = runs[1].workdir / "dp_finetune"
    assert json.loads((copied / "summary.json").read_text())["params_sha256"] == "dpwave_eps10/0"  # the same model
    assert not (copied / "secret_seed.json").exists()
    assert "copied dp_finetune, pretrain, refiner, tokenizer" in capsys.readouterr().out


@pytest.mark.integration
def test_a_post_processing_row_of_an_unfinished_run_fails_and_the_others_still_run(tmp_path, capsys):
    guided, other = tables.resample(row("dpwave_eps1"), temperature=0.8), row("dpwave_eps10")
    runs = reproduce.plan([guided, other], tmp_path, [0])
    assert reproduce.execute(runs, fake_pipeline(runs, {})) == [runs[0]]
    assert runs[1].finished and not runs[0].workdir.exists()
    assert "run row dpwave_eps1 seed 0 first" in capsys.readouterr().err


@pytest.mark.integration
@pytest.mark.parametrize("fields, message", [
    (dict(sampling=("dp.mechanism.steps=3",), resamples="x"), "not sample.KEY=VALUE"),
    (dict(sampling=("sample.temperature=0.8",)), "go together"), (dict(resamples="x"), "go together")])
def test_a_post_processing_row_changes_sampling_only(fields, message):
    with pytest.raises(ValueError, match=message):
        tables.Row("r", "experiments/configs/mnist.py:tiny", "dpwave", "1", **fields)


@pytest.mark.integration
@pytest.mark.slow
def test_a_post_processing_row_resamples_a_real_run(tmp_path):
    """The pipeline itself accepts the copied stages (equal fingerprints, no secret) and samples with the row's
    settings; the model's epsilon is the source's."""
    source = row("dpwave_eps10")
    cooler = tables.resample(source, temperature=0.5)
    runs = reproduce.plan([source, cooler], tmp_path, [0])
    assert reproduce.execute(runs) == []
    metrics = [json.loads(r.metrics_path.read_text()) for r in runs]
    assert metrics[0]["epsilon"] == metrics[1]["epsilon"] and metrics[0]["fd_cls"] != metrics[1]["fd_cls"]
    config = json.loads((runs[1].workdir / "config.json").read_text())
    assert config["config"]["sample"]["temperature"] == 0.5


@pytest.mark.integration
def test_a_config_that_cannot_load_only_loses_the_reuse(tmp_path, capsys):
    run = reproduce.plan([row("dpwave_eps1")], tmp_path, [0], "nokey=1")[0]
    assert reproduce.execute([run], lambda command: 5) == [run]
    out = capsys.readouterr().out
    assert "no stage reuse: cannot load the run's config" in out and "unknown config arg 'nokey'" in out
    assert "Traceback" not in out


# -- controls, settings, seeds across sessions, overrides ----------------------------------------------
@pytest.mark.integration
@pytest.mark.parametrize("table", ["mnist_cpu", "mnist_shift", "mnist_curve", "mnist_tiny"])
def test_every_method_has_both_controls_next_to_its_dp_rows(table):
    rows = get_table(table)
    for method in {r.method for r in rows}:
        epsilons = [r.epsilon for r in rows if r.method == method]
        assert epsilons[-2:] == ["inf", "public"], (method, epsilons)
    if table == "mnist_curve":
        assert {r.method for r in rows} == {"dpwave", "full_dp", "dp_merf", "dpwave_merf", "dp_diffusion"}
        assert [r.epsilon for r in rows if r.method == "dpwave"] == [
            "0.5", "1", "2", "4", "8", "10", "16", "inf", "public"]


@pytest.mark.integration
def test_scaling_table_has_a_setting_column_and_the_public_control(tmp_path):
    rows = get_table("mnist_scaling")
    assert {r.setting_label for r in rows} == {"n_private=500", "n_private=1000", "n_private=2000", ""}
    full = [r for r in rows if r.setting_label == "n_private=2000"]  # all private digits: the shift table's rows
    assert [r.label for r in full] == ["dpwave_eps1", "dpwave_eps10"]
    assert {r.spec for r in full} <= {r.spec for r in get_table("mnist_shift")}
    assert rows[0].spec == "experiments/configs/mnist.py:shift,n_private=500,method=dpwave,epsilon=1"
    write_run(tmp_path, "dpwave_n500_eps1", 0, fake_metrics(0, 50.0, 0.4))
    write_run(tmp_path, "dpwave_public", 0, fake_metrics(0, 60.0, 0.36, epsilon=0.0))
    md = reproduce.markdown("mnist_scaling", reproduce.aggregate(rows, reproduce.plan(rows, tmp_path, [0])))
    header = [c.strip() for c in md.splitlines()[2].strip("|").split("|")]
    assert header[:3] == ["method", "setting", "ε target"]
    assert table_line(md, "dpwave", "n_private=500")[2:5] == ["1", "1", "50"]
    assert table_line(md, "dpwave", "")[2:4] == ["0 (public only)", "0"]
    assert table_line(md, "dpwave", "n_private=2000")[2] == "1"


@pytest.mark.integration
def test_fair_table_shares_the_shift_rows_and_labels_its_own_public_control():
    rows = get_table("mnist_fair")
    same = [r for r in rows if r.setting_label == "pretrain_steps=800"]
    matched = [r for r in rows if r.setting_label == tables.MATCHED_PRETRAIN]
    assert {r.spec for r in same} == {r.spec for r in get_table("mnist_shift") if r.method in ("dpwave", "full_dp")}
    assert [r.label for r in matched] == ["full_dp_pre210_eps1", "full_dp_pre210_eps10", "full_dp_pre210_epsinf",
                                          "full_dp_pre210_public"]  # a public control of its own: pretraining differs
    assert len({r.label for r in rows}) == len(rows)
    assert tables.label("dpwave", "public", "n_private=500,recipe=cond") == "dpwave_public"  # reads neither


@pytest.mark.integration
def test_matched_pretraining_steps_give_full_dp_dpwaves_pretraining_flops():
    from dpwave.train import settings
    from experiments.bench import bench_flops

    def flops(spec: str) -> float:
        config = reproduce.load_config(["python", "-m", "dpwave.main", f"--config={spec}", "--workdir=/tmp/x"])
        return bench_flops.measure(settings.read(config).transformer)["xla_train_flops"] * config.pretrain.steps

    dpwave = next(r for r in get_table("mnist_fair") if r.label == "dpwave_public")
    matched = next(r for r in get_table("mnist_fair") if r.label == "full_dp_pre210_public")
    assert flops(matched.spec) == pytest.approx(flops(dpwave.spec), rel=0.005)


@pytest.mark.integration
def test_table_aggregates_every_finished_seed_and_report_only_runs_nothing(tmp_path):
    for seed, value in ((0, 4.0), (2, 8.0)):  # seed 2 finished in another session
        write_run(tmp_path, "dpwave_eps1", seed, fake_metrics(seed, value, 0.9))

    def runner(command):
        raise AssertionError(f"--report-only ran {command}")

    assert reproduce.main(["--table", "mnist_tiny", "--workdir", str(tmp_path), "--seeds", "0",
                           "--report-only"], runner=runner) == 0
    md = (tmp_path / "mnist_tiny.md").read_text()
    cells = table_line(md, "dpwave", "1")
    assert cells[3].startswith("6 ± ") and cells[-1] == "2/2"
    assert table_line(md, "full_dp", "1")[-1] == "0/2"


@pytest.mark.integration
def test_set_passes_config_overrides_to_every_run(tmp_path):
    run = reproduce.plan([row("dpwave_eps1")], tmp_path, [0],
                         overrides=["dp.recipe.trainable=cond", "dp.recipe.ema_decay=0.9"])[0]
    assert run.command[4:6] == ["--config.dp.recipe.trainable=cond", "--config.dp.recipe.ema_decay=0.9"]
    config = reproduce.load_config(run.command)
    assert (config.dp.recipe.trainable, config.dp.recipe.ema_decay) == ("cond", 0.9)
    result = cli("--table", "mnist_tiny", "--workdir", str(tmp_path), "--set", "dp.recipe.trainable", "--dry-run")
    assert result.returncode == 2 and "expected KEY=VALUE" in result.stderr


@pytest.mark.integration
def test_dp_wall_time_comes_from_the_owner_only_timing_file(tmp_path):
    metrics = fake_metrics(0, 4.0, 0.9)
    del metrics["dp_wall_time_s"]  # the pipeline keeps it out of metrics.json
    write_run(tmp_path, "dpwave_eps1", 0, metrics)
    stage = tmp_path / "dpwave_eps1" / "seed0" / "dp_finetune"
    stage.mkdir()
    (stage / "private_timing.json").write_text(json.dumps({"stage": "dp_finetune", "wall_time_s": 12.5}))
    assert reproduce.read_metrics(tmp_path / "dpwave_eps1" / "seed0" / "metrics.json")["dp_wall_time_s"] == 12.5


@pytest.mark.integration
def test_a_shared_public_control_is_drawn_once_per_method(tmp_path):
    rows = get_table("mnist_scaling")
    for r in rows:
        write_run(tmp_path, r.label, 0, fake_metrics(0, 10.0 if r.epsilon == "public" else 20.0, 0.5))
    ax = reproduce.figure("s", reproduce.aggregate(rows, reproduce.plan(rows, tmp_path, [0]))).axes[0]
    dotted = [line for line in ax.get_lines() if line.get_linestyle() == ":"]
    assert len(dotted) == 1 and dotted[0].get_color() == "k" and dotted[0].get_ydata()[0] == 10.0
    assert len([line for line in ax.get_lines() if line.get_marker() == "o"]) == 3  # one line per N
