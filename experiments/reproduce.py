"""Runs a table's rows (every seed) with `python -m dpwave.main` and writes the table.

    python -m experiments.reproduce --table mnist_cpu --workdir DIR [--seeds 0,1] [--rows a,b]
        [--extra-args manual_dir=/data/raw] [--set dp.recipe.trainable=cond ...] [--dry-run] [--report-only]
        [--no-reuse]

The privacy-utility curve of any config (the public-only control, the listed epsilons and epsilon inf, each a run
on the private data that spends its own epsilon; also writes `DIR/curve_samples.png`, one row of samples per
run; docs/your_images.md):

    python -m experiments.reproduce --table curve --config=experiments/configs/folder.py:public=A,private=B
        --workdir DIR [--epsilons 1,4,10]

Each run lives in `DIR/<row>/seed<k>`; a run whose `metrics.json` exists is finished and skipped,
an unfinished one is rerun and resumes. Runs go one after another; a failed run is reported and the
others still run. `--rows` and `--seeds` split a table across sessions (or machines sharing DIR): the
table aggregates every finished seed found under DIR, and `--report-only` only rewrites it. `--set`
appends `--config.KEY=VALUE` overrides to every run (give such runs their own DIR).

Before a run starts, each stage it lacks whose `public` flag is set (tokenizer, pretrain, refiner) is
copied from another run under DIR (of this invocation first, then of any table sharing DIR) that finished
it from the same inputs (equal `inputs_sha256`, see dpwave/train/pipeline.py), so e.g. the epsilon rows of
a method train them once;
the DP stage and everything after it are never copied (`--no-reuse` turns copying off). A post-processing row
(`tables.resample`, e.g. in `mnist_ablate`) is the exception: it copies every trained stage, the DP stage
included, of the same seed of the row it resamples and runs only sampling and evaluation with its own `sample`
settings: one DP model, several samplings, no further epsilon.

Then `metrics.json` is aggregated over seeds (mean +- std, n) into `DIR/<table>.md`, `DIR/<table>.json`
and `DIR/<table>.png` (FD-cls, FD-lowpass, downstream and conditioning accuracy and, when measured, FID vs
epsilon per method, std as error bars; each method's controls, epsilon inf and the public-only model, as
horizontal lines with their std as a band). A metric missing from every metrics.json of a row (written
before the metric existed) shows as "-".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import ml_collections
from absl import flags
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from ml_collections import config_flags

from experiments.configs import common
from experiments.configs.tables import CURVE_DEFAULT, PUBLIC, TABLES, Row, curve, get_table

REPO = Path(__file__).resolve().parents[1]
# (metrics.json key, column header, formatter of a mean/std).
METRICS: tuple[tuple[str, str, Callable[[float], str]], ...] = (
    ("epsilon", "ε spent", lambda v: f"{v:.3g}"),
    ("fd_cls", "FD-cls (surrogate, not FID)", lambda v: f"{v:.3g}"),
    ("fd_lowpass", "FD-lowpass (shape)", lambda v: f"{v:.3g}"),
    ("fid", "FID", lambda v: f"{v:.3g}"),
    ("precision", "precision", lambda v: f"{v:.3f}"),
    ("recall", "recall", lambda v: f"{v:.3f}"),
    ("cond_accuracy", "cond acc", lambda v: f"{v:.3f}"),
    ("downstream_accuracy", "downstream acc", lambda v: f"{v:.3f}"),
    ("memorization_ratio", "memorization ratio", lambda v: f"{v:.3f}"),
    ("dp_wall_time_s", "DP wall time (s)", lambda v: f"{v:.3g}"),
    ("dp_step_flops", "DP FLOPs/step", lambda v: f"{v:.3g}"),
)
TITLES = {key: title for key, title, _ in METRICS}
CONFIG_ERRORS = (OSError, ValueError, KeyError, AttributeError, TypeError, flags.Error)
PLOTTED = ("fd_cls", "fd_lowpass", "downstream_accuracy", "cond_accuracy")
Runner = Callable[[list[str]], int]


@dataclasses.dataclass(frozen=True)
class Run:
    """One seed of one row."""

    row: Row
    seed: int
    workdir: Path
    command: list[str]

    @property
    def metrics_path(self) -> Path:
        return self.workdir / "metrics.json"

    @property
    def finished(self) -> bool:
        return self.metrics_path.exists()


@dataclasses.dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation over the `n` seeds that reported a value."""

    mean: float | None
    std: float | None
    n: int

    def format(self, fmt: Callable[[float], str]) -> str:
        if self.mean is None:
            return "n/a"
        return fmt(self.mean) if self.std is None else f"{fmt(self.mean)} ± {fmt(self.std)}"


@dataclasses.dataclass(frozen=True)
class RowResult:
    row: Row
    seeds_done: int
    seeds_wanted: int
    stats: dict[str, Stat]
    reasons: dict[str, list[str]]  # metric -> distinct reasons it was null
    absent: frozenset[str] = frozenset()  # metrics no finished seed's metrics.json has (older runs)


def plan(rows: Sequence[Row], workdir: Path, seeds: Sequence[int], extra_args: str = "",
         overrides: Sequence[str] = ()) -> list[Run]:
    """Every (row, seed) run with its `python -m dpwave.main` command (`overrides`: KEY=VALUE config
    overrides, passed as `--config.KEY=VALUE`)."""
    runs = []
    for row in rows:
        for seed in seeds:
            run_dir = workdir / row.label / f"seed{seed}"
            spec = ",".join(filter(None, (row.spec, extra_args, f"seed={seed}")))
            command = [sys.executable, "-m", "dpwave.main", f"--config={spec}",
                       *(f"--config.{o}" for o in (*overrides, *row.sampling)), f"--workdir={run_dir}"]
            runs.append(Run(row, seed, run_dir, command))
    return runs


def finished_seeds(rows: Sequence[Row], workdir: Path) -> set[int]:
    """The seeds with a finished run (`<row>/seed<k>/metrics.json`) of any of `rows` under `workdir`."""
    return {int(m.group(1)) for row in rows for path in (workdir / row.label).glob("seed*/metrics.json")
            if (m := re.fullmatch(r"seed(\d+)", path.parent.name))}


def run_subprocess(command: list[str]) -> int:
    """Runs one command from the repository root (relative config paths resolve) and returns its code."""
    path = os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH"))))
    env = dict(os.environ, PYTHONPATH=path)
    return subprocess.run(command, cwd=REPO, env=env, check=False).returncode


def load_config(command: Sequence[str]) -> ml_collections.ConfigDict:
    """The config a `python -m dpwave.main` command resolves, loaded in this process as dpwave.main
    loads it (config_flags, locked; `--config.*` overrides applied), a relative path from the repository."""
    argv = ["dpwave.main"]
    for arg in command:
        if arg.startswith("--config="):
            path, sep, variant = arg.removeprefix("--config=").partition(":")
            argv.append(f"--config={REPO / path}{sep}{variant}")
        elif arg.startswith("--config."):
            argv.append(arg)
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True, sys_argv=argv)
    flag_values(argv)
    return flag_values.config


def _summary(stage_dir: Path, name: str = "summary.json") -> dict:
    """A stage's summary.json (or other JSON file `name`); {} while it is unfinished (or the file is unreadable)."""
    try:
        return json.loads((stage_dir / name).read_text())
    except (OSError, ValueError):
        return {}


def _same_params(a: Path, b: Path) -> bool:
    """Both stage directories are finished with the same parameters."""
    sha = _summary(a).get("params_sha256")
    return sha is not None and sha == _summary(b).get("params_sha256")


def _copy_atomically(source: Path, target: Path, leave_out: Sequence[str] = ()) -> None:
    """copytree (without the files named in `leave_out`) into a temporary sibling, then one rename: `target` is
    either complete or absent."""
    tmp = target.with_name(f".{target.name}.copying")
    if tmp.exists():
        shutil.rmtree(tmp)  # left by an interrupted copy
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns(*leave_out))
    (tmp / "reused_from.json").write_text(json.dumps({"source": str(source)}))
    os.replace(tmp, target)


def reuse_public_stages(run: Run, sources: Sequence[Path]) -> list[tuple[str, Path]]:
    """Copies into `run.workdir` each public stage it lacks that another run directory in `sources` finished
    from the same inputs (equal `inputs_sha256`, and for a stage that consumes others, such as pretrain, the
    same parameters in those as `run` holds). Returns (stage, source run directory) per copied stage."""
    from dpwave.train import pipeline, settings  # JAX and the models: imported only once a run is about to start

    run_settings = settings.read(load_config(run.command))
    wanted = pipeline.stage_fingerprints(run_settings)
    copied = []
    for stage in pipeline.stages(run_settings):
        target = run.workdir / stage.name
        if not stage.public or target.exists():  # only stages computed from public data are ever copied
            continue
        source = next((s for s in sources if s != run.workdir
                       and _summary(s / stage.name).get("inputs_sha256") == wanted[stage.name]
                       and all(_same_params(s / c, run.workdir / c) for c in stage.consumes if c in wanted)),
                      None)
        if source is not None:
            _copy_atomically(source / stage.name, target)
            copied.append((stage.name, source))
    return copied


POST_PROCESSING = ("sample", "evaluate")  # the stages a post-processing row runs itself


def copy_trained_stages(run: Run, workdir: Path) -> list[str]:
    """For a post-processing row: copies every finished stage but POST_PROCESSING (the DP stage included: the
    same DP model, without its secret, which a finished stage never reads) of the same seed of the row it
    resamples into `run.workdir`; the run's own fingerprint check then refuses any that its config would not have
    trained. Returns the copied stages' names."""
    from dpwave.train.secret_seed import SECRET_SEED_FILE  # imports JAX: only once a run is about to start

    source = workdir / run.row.resamples / f"seed{run.seed}"
    if not (source / "metrics.json").exists():
        raise FileNotFoundError(f"{run.row.label} resamples {source}, which is not finished: run row "
                                f"{run.row.resamples} seed {run.seed} first")
    copied = []
    for stage_dir in sorted(p for p in source.iterdir() if (p / "summary.json").exists()):
        if stage_dir.name not in POST_PROCESSING and not (run.workdir / stage_dir.name).exists():
            _copy_atomically(stage_dir, run.workdir / stage_dir.name, leave_out=(SECRET_SEED_FILE,))
            copied.append(stage_dir.name)
    return copied


def _reuse(run: Run, sources: Sequence[Path]) -> None:
    try:
        copied = reuse_public_stages(run, sources)
    except CONFIG_ERRORS as e:  # the run itself reports a bad config; it only loses the reuse
        last = (str(e).strip().splitlines() or [""])[-1]  # config_flags puts the whole traceback in a ValueError
        print(f"  no stage reuse: cannot load the run's config ({type(e).__name__}: {last})", flush=True)
        return
    for stage, source in copied:
        print(f"  reused {stage} from {source.parent.name}/{source.name} (same inputs_sha256)", flush=True)


def run_dirs(workdir: Path) -> list[Path]:
    """Every run directory (`<row>/seed<k>`) under `workdir`, of any table that shares it."""
    return sorted(p for p in workdir.glob("*/seed*") if p.is_dir() and re.fullmatch(r"seed\d+", p.name))


def execute(runs: Sequence[Run], runner: Runner = run_subprocess, reuse: bool = True,
            sources: Sequence[Path] = ()) -> list[Run]:
    """Runs the unfinished runs in order, each after copying the public stages it can reuse from the
    others or from the run directories `sources` (unless `reuse` is False); returns those that failed
    (nonzero exit or no metrics.json)."""
    pool = [*(r.workdir for r in runs), *(s for s in sources if s not in {r.workdir for r in runs})]
    failed = []
    for i, run in enumerate(runs, 1):
        if run.finished:
            print(f"[{i}/{len(runs)}] {run.row.label} seed {run.seed}: finished, skipped", flush=True)
            continue
        print(f"[{i}/{len(runs)}] {run.row.label} seed {run.seed}: {shlex.join(run.command)}",
              flush=True)
        if run.row.resamples:
            try:
                copied = copy_trained_stages(run, run.workdir.parents[1])
            except FileNotFoundError as e:
                print(f"  FAILED: {e}", file=sys.stderr, flush=True)
                failed.append(run)
                continue
            print(f"  post-processing of {run.row.resamples}/seed{run.seed}: copied {', '.join(copied) or 'nothing'}",
                  flush=True)
        if reuse:
            _reuse(run, pool)
        code = runner(run.command)
        if code != 0 or not run.finished:
            state = "present" if run.finished else "missing"
            print(f"  FAILED (exit code {code}, metrics.json {state})", file=sys.stderr, flush=True)
            failed.append(run)
    return failed


DP_STAGES = ("dp_finetune", "dp_embedding", "dp_diffusion")  # each method's one DP stage


def read_metrics(path: Path) -> dict:
    """A run's metrics.json plus the DP stage's wall time, which the pipeline keeps out of metrics.json (it
    depends on the Poisson draws) in the owner-only private_timing.json of its DP stage (DP_STAGES); a value that
    is neither a number nor null is a ValueError."""
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it to rerun the run") from None
    timing = next((t for stage in DP_STAGES if (t := _summary(path.parent / stage, "private_timing.json"))), {})
    metrics.setdefault("dp_wall_time_s", timing.get("wall_time_s"))
    for key, _, _ in METRICS:
        value = metrics.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"{path}: {key}={value!r} is not a number or null; the pipeline wrote a "
                             "bad metrics.json (delete it to rerun the run)")
    return metrics


def summarize(values: Sequence[float | None]) -> Stat:
    """Mean +- sample std over the non-null values (std only with 2 or more)."""
    present = [float(v) for v in values if v is not None]
    if not present:
        return Stat(None, None, 0)
    std = statistics.stdev(present) if len(present) > 1 and all(map(math.isfinite, present)) else None
    return Stat(statistics.fmean(present), std, len(present))


def aggregate(rows: Sequence[Row], runs: Sequence[Run]) -> list[RowResult]:
    """Per row, the statistics of every metric over its finished seeds."""
    results = []
    for row in rows:
        row_runs = [r for r in runs if r.row == row]
        metrics = [read_metrics(r.metrics_path) for r in row_runs if r.finished]
        stats = {key: summarize([m.get(key) for m in metrics]) for key, _, _ in METRICS}
        reasons: dict[str, list[str]] = {}
        for m in metrics:
            for key, why in (m.get("reasons") or {}).items():
                if m.get(key) is None and str(why) not in reasons.setdefault(key, []):
                    reasons[key].append(str(why))
        absent = frozenset(key for key, _, _ in METRICS if metrics and not any(key in m for m in metrics))
        results.append(RowResult(row, len(metrics), len(row_runs), stats, reasons, absent))
    return results


def epsilon_label(epsilon: str) -> str:
    """The ε target cell: the public-only control reads as such."""
    return "0 (public only)" if epsilon == PUBLIC else epsilon


def markdown(table: str, results: Sequence[RowResult]) -> str:
    """The table in markdown; the FID column only when some run measured it, a setting column only when
    some row has one; null reasons below."""
    shown = [m for m in METRICS if m[0] != "fid" or any(r.stats["fid"].n for r in results)]
    settings = any(r.row.setting_label for r in results)
    header = ["method", *["setting"] * settings, "ε target", *(title for _, title, _ in shown), "seeds"]
    lines = [f"## {table}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        values = ["—" if not r.seeds_done else "-" if k in r.absent else r.stats[k].format(fmt)
                  for k, _, fmt in shown]
        cells = [r.row.method, *[r.row.setting_label] * settings, epsilon_label(r.row.epsilon), *values,
                 f"{r.seeds_done}/{r.seeds_wanted}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Mean ± sample std over seeds; — not run yet; n/a null in every run (reasons "
              "below); - not in the runs' metrics.json (written before the metric existed). FD-cls is the Fréchet "
              "distance in the features of a classifier trained on held-out real data (a surrogate, not FID); "
              "FD-lowpass the Fréchet distance of the 8x8 low-pass images (shape, not texture); cond acc the share "
              "of samples that classifier labels as their prompted class. DP wall time is the operator's own "
              "measurement (the owner-only private_timing.json of the DP stage): it depends on the Poisson draws and "
              "is not covered by the DP guarantee."]
    notes = sorted({(key, why) for r in results for key, whys in r.reasons.items() for why in whys})
    if notes:
        lines += ["", "n/a:"] + [f"- {key}: {why}" for key, why in notes]
    return "\n".join(lines) + "\n"


def to_json(table: str, results: Sequence[RowResult]) -> dict:
    """The aggregated table as JSON (epsilon targets as strings: "inf" is not a JSON number)."""
    def clean(v: float | None) -> float | str | None:
        return v if v is None or math.isfinite(v) else str(v)
    return {"table": table, "rows": [{
        "label": r.row.label, "method": r.row.method, "epsilon": r.row.epsilon, "setting": r.row.setting_label,
        "spec": r.row.spec,
        "seeds_done": r.seeds_done, "seeds_wanted": r.seeds_wanted, "reasons": r.reasons,
        "metrics": {k: {"mean": clean(s.mean), "std": clean(s.std), "n": s.n}
                    for k, s in r.stats.items()},
    } for r in results]}


CONTROL_STYLES = {"inf": ("--", "ε = ∞ (no noise)"), PUBLIC: (":", "public only (no DP stage)")}


def _control_line(ax: Axes, result: RowResult, key: str, colour: str, name: str) -> None:
    """A control row's mean as a horizontal line, its std as a band around it."""
    stat = result.stats[key]
    if stat.mean is None:
        return
    style, what = CONTROL_STYLES[result.row.epsilon]
    ax.axhline(stat.mean, color=colour, linestyle=style, label=f"{name}: {what}")
    if stat.std:
        ax.axhspan(stat.mean - stat.std, stat.mean + stat.std, color=colour, alpha=0.1)


def figure(table: str, results: Sequence[RowResult]) -> Figure:
    """The PLOTTED metrics (and FID when measured) vs epsilon, one line per method (and setting), std as error
    bars; each line's controls (epsilon inf, public only) as horizontal lines in its colour, their std as a band;
    one legend for every panel, below them.
    A public-only control without a setting (nothing in it trains on private data) is drawn once per method, in
    black when the method has lines for several settings."""
    keys = ("fid",) * any(r.stats["fid"].n for r in results) + PLOTTED
    epsilons = sorted({r.row.epsilon_value for r in results if not r.row.is_control})
    fig = Figure(figsize=(5 * len(keys), 5), layout="constrained")
    for ax, key in zip(fig.subplots(1, len(keys), squeeze=False)[0], keys):
        shared = [r for r in results if r.row.epsilon == PUBLIC and not r.row.setting_label]
        groups = list(dict.fromkeys((r.row.method, r.row.setting_label) for r in results if r not in shared))
        colours = {group: f"C{i}" for i, group in enumerate(groups)}
        for (method, setting), colour in colours.items():
            name = " ".join(filter(None, (method, setting)))
            mine = [r for r in results if (r.row.method, r.row.setting_label) == (method, setting) and r not in shared]
            points = sorted((r.row.epsilon_value, r.stats[key]) for r in mine
                            if not r.row.is_control and r.stats[key].mean is not None)
            if points:
                ax.errorbar([e for e, _ in points], [s.mean for _, s in points], yerr=[s.std or 0.0 for _, s in points],
                            marker="o", capsize=3, color=colour, label=name)
            for r in mine:
                if r.row.is_control:
                    _control_line(ax, r, key, colour, name)
        for r in shared:
            own = [group for group in groups if group[0] == r.row.method]
            _control_line(ax, r, key, colours[own[0]] if len(own) == 1 else "k", r.row.method)
        if not ax.has_data():
            ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
        ax.set_xscale("log")
        ax.set_xticks(epsilons, [f"{e:g}" for e in epsilons])
        ax.minorticks_off()
        ax.set(xlabel="ε (target)", title=TITLES[key])
    entries = {label: handle for ax in fig.axes for handle, label in zip(*ax.get_legend_handles_labels())}
    legend = dict(sorted(entries.items(), key=lambda entry: ":" in entry[0]))  # the methods, then the controls
    if legend:
        fig.legend(legend.values(), legend.keys(), loc="outside lower center", ncols=min(len(legend), 4),
                   fontsize="small")
    fig.suptitle(table)
    return fig


def plot(table: str, results: Sequence[RowResult], path: Path) -> None:
    """Writes `figure(table, results)` to `path`."""
    figure(table, results).savefig(path, dpi=100)


def write_outputs(table: str, results: Sequence[RowResult], workdir: Path) -> list[Path]:
    """Writes `<table>.md`, `.json` and `.png` into `workdir`; returns their paths."""
    workdir.mkdir(parents=True, exist_ok=True)
    md, js, png = (workdir / f"{table}.{ext}" for ext in ("md", "json", "png"))
    md.write_text(markdown(table, results))
    js.write_text(json.dumps(to_json(table, results), indent=2))
    plot(table, results, png)
    return [md, js, png]


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2] (distinct integers)."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds={text!r}: expected integers like 0,1,2") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"--seeds={text!r}: expected distinct integers like 0,1,2")
    return seeds


def select_rows(rows: Sequence[Row], labels: str | None) -> list[Row]:
    """The rows named in `labels` (comma-separated), in table order; all rows when None."""
    if labels is None:
        return list(rows)
    wanted = [s for s in labels.split(",") if s]
    unknown = sorted(set(wanted) - {r.label for r in rows})
    if unknown or not wanted:
        raise ValueError(f"--rows={labels!r}: unknown rows {unknown}; this table has "
                         f"{[r.label for r in rows]}")
    return [r for r in rows if r.label in wanted]


CURVE = "curve"  # the table made from --config and --epsilons
SAMPLE_COLUMNS = 10  # samples per run in the curve's sample sheet


def parse_epsilons(text: str) -> tuple[str, ...]:
    """'1,4,10' -> ('1', '4', '10'): distinct finite epsilons > 0 (the curve adds its controls, public and inf)."""
    epsilons = tuple(e.strip() for e in text.split(",") if e.strip())
    try:
        ok = bool(epsilons) and all(0 < common.epsilon_value(e) < math.inf for e in epsilons)
    except ValueError:
        ok = False
    if not ok or len(set(epsilons)) != len(epsilons):
        raise argparse.ArgumentTypeError(f"--epsilons={text!r}: expected distinct numbers > 0 like 1,4,10 (the "
                                         "curve always adds the public-only control and epsilon inf)")
    return epsilons


def table_rows(table: str, config: str | None, epsilons: tuple[str, ...] | None) -> tuple[Row, ...]:
    """The rows of `table`: a named table, or `curve` over `config` at `epsilons` (default CURVE_DEFAULT)."""
    if table == CURVE:
        if not config:
            raise ValueError("--table curve needs --config=SPEC, e.g. experiments/configs/folder.py:public=A,"
                             "private=B (the runs append method=, epsilon= and seed=)")
        return curve(config, epsilons or CURVE_DEFAULT)
    if config or epsilons:
        raise ValueError(f"--config and --epsilons make the {CURVE!r} table; --table {table} has its own rows")
    return get_table(table)


def write_sample_sheet(table: str, runs: Sequence[Run], workdir: Path) -> Path | None:
    """`<table>_samples.png`: the first SAMPLE_COLUMNS samples of each row's first finished run (its
    `sample/samples.npz`), one labelled row per table row; None when no run has samples yet."""
    from dpwave import files, grids  # numpy and PIL only

    rows: dict[str, object] = {}
    for run in runs:
        path = run.workdir / "sample" / "samples.npz"
        if run.row.label not in rows and run.finished and path.exists():
            rows[run.row.label] = files.read_npz(path)["images"]
    if not rows:
        return None
    path = workdir / f"{table}_samples.png"
    grids.sample_grid(rows, path, SAMPLE_COLUMNS)
    return path


def main(argv: Sequence[str] | None = None, runner: Runner = run_subprocess) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", required=True, help=f"one of {sorted(TABLES)} (experiments/configs/tables.py), "
                        f"or {CURVE} (with --config)")
    parser.add_argument("--config", help=f"--table {CURVE}: the config spec whose privacy-utility curve to run, e.g. "
                        "experiments/configs/folder.py:public=A,private=B")
    parser.add_argument("--epsilons", type=parse_epsilons, help=f"--table {CURVE}: comma-separated target epsilons "
                        f"(default {','.join(CURVE_DEFAULT)}); the public-only control and epsilon inf are added")
    parser.add_argument("--workdir", required=True, type=Path, help="one subdirectory per row and seed")
    parser.add_argument("--seeds", type=parse_seeds, default=[0], help="comma-separated (default 0)")
    parser.add_argument("--rows", help="comma-separated row labels to run (default: all); the table "
                        "still reports every row")
    parser.add_argument("--extra-args", default="", help="appended to every row's :arg, e.g. "
                        "manual_dir=/data/raw,data_dir=/data/tfds")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="a config override for every run, e.g. dp.recipe.trainable=cond (repeatable); use a "
                        "separate --workdir for each set of overrides")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    parser.add_argument("--report-only", action="store_true", help="run nothing: write the table from the "
                        "finished runs under --workdir")
    parser.add_argument("--no-reuse", action="store_true", help="train every run's public stages itself "
                        "instead of copying finished ones with equal inputs_sha256 from other runs")
    args = parser.parse_args(argv)
    try:
        rows = table_rows(args.table, args.config, args.epsilons)
        selected = select_rows(rows, args.rows)
    except ValueError as e:
        parser.error(str(e))
    if any("=" not in part for part in filter(None, args.extra_args.split(","))):
        parser.error(f"--extra-args={args.extra_args!r}: expected key=value pairs separated by commas")
    if bad := [o for o in args.overrides if not re.fullmatch(r"[\w.]+=.*", o)]:
        parser.error(f"--set {bad[0]!r}: expected KEY=VALUE with a dotted config key, e.g. dp.recipe.trainable=cond")
    workdir = args.workdir.resolve()
    if args.dry_run:
        for run in plan(selected, workdir, args.seeds, args.extra_args, args.overrides):
            print(("# finished: " if run.finished else "") + shlex.join(run.command))
        return 0
    failed = [] if args.report_only else execute(
        plan(selected, workdir, args.seeds, args.extra_args, args.overrides), runner, reuse=not args.no_reuse,
        sources=run_dirs(workdir))
    seeds = sorted(set(args.seeds) | finished_seeds(rows, workdir))
    results = aggregate(rows, plan(rows, workdir, seeds, args.extra_args, args.overrides))
    for path in write_outputs(args.table, results, workdir):
        print(f"wrote {path}")
    if args.table == CURVE and (sheet := write_sample_sheet(args.table, plan(rows, workdir, seeds), workdir)):
        print(f"wrote {sheet}")
    if failed:
        print(f"{len(failed)} run(s) failed: {[f'{r.row.label}/seed{r.seed}' for r in failed]}",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
