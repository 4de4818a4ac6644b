"""Same-machine regression guard: the pinned tiny pipeline at a git revision and at the working tree, bit for bit.

    python -m experiments.regress --against=HEAD [--out DIR] [--workdir DIR] [--config CONFIG]

Runs `python -m dpwave.main` on `--config` (default `experiments/configs/mnist.py:tiny`) with the fixed DP secret
`DPWAVE_DP_SECRET_SEED=SECRET_SEED` (the environment: every revision reads it, whatever its config layout) twice
on this machine, one after the other: first
at `--against` (checked out with `git worktree add` under a temporary directory, run with this Python and
`PYTHONPATH` pointing at that worktree, removed afterwards), then at the working tree. It then compares every
stage's digests (each `<workdir>/<stage>/summary.json` key ending in `_sha256` except `inputs_sha256`: the
parameters of the training stages, the samples) and every number in `<workdir>/metrics.json` (nested keys
dotted) bit for bit, prints a table, and writes it as `regress.json` and `regress.md` under `--out` if given.

A value found on one side only (e.g. a metric that the older revision did not compute) is listed as absent and
does not count as a difference. Exit status: 0 when every value present on both sides is identical, 1 when one
differs, 2 when the revision is unknown or a run fails. A refactor that must not change any number passes
with 0; floating-point results are only comparable on one machine with one jax/jaxlib, hence the two runs here.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIG = "experiments/configs/mnist.py:tiny"
SECRET_SEED = "20261129" * 4  # the DP stage's secret, 128 bits in hex: fixed, so both runs draw the same noise
WORKING = "working tree"
EQUAL, DIFFERENT = "equal", "DIFFERENT"


@dataclasses.dataclass(frozen=True)
class Row:
    """One compared value: a stage digest (`<stage>/<key>`) or a metric (its dotted key in metrics.json)."""

    name: str
    against: Any
    working: Any
    status: str  # EQUAL, DIFFERENT, or "absent at <side>"


class _Absent:
    def __repr__(self) -> str:
        return "absent"


ABSENT = _Absent()


def identical(a: Any, b: Any) -> bool:
    """Bit-for-bit equality: floats by their IEEE-754 bytes (so -0.0 != 0.0 and a NaN equals itself), other
    values by type and value."""
    if isinstance(a, float) and isinstance(b, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    return type(a) is type(b) and a == b


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """The numeric leaves (numbers, booleans, None) of nested dicts and lists, keyed by dotted path; text is
    left out (names and reasons are not numbers)."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return {} if isinstance(value, str) else {prefix: value}
    out: dict[str, Any] = {}
    for key, item in items:
        out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return out


def digests(workdir: Path) -> dict[str, str]:
    """Every stage's digests, `<stage>/<key>`, in the order the stages finished."""
    summaries = sorted(workdir.glob("*/summary.json"), key=lambda p: p.stat().st_mtime_ns)
    out = {}
    for path in summaries:
        summary = json.loads(path.read_text())
        out.update({f"{path.parent.name}/{key}": value for key, value in summary.items()
                    if key.endswith("_sha256") and key != "inputs_sha256"})
    return out


def collect(workdir: Path) -> dict[str, Any]:
    """What a run is compared on: its stage digests, then the numbers of its metrics.json."""
    return {**digests(workdir), **flatten(json.loads((workdir / "metrics.json").read_text()))}


def compare(against: dict[str, Any], working: dict[str, Any]) -> list[Row]:
    """One row per name found on either side, in the against run's order, then the working tree's new ones."""
    rows = []
    for name in {**against, **working}:
        a, w = against.get(name, ABSENT), working.get(name, ABSENT)
        if a is ABSENT or w is ABSENT:
            status = f"absent at {'against' if a is ABSENT else WORKING}"
        else:
            status = EQUAL if identical(a, w) else DIFFERENT
        rows.append(Row(name, a, w, status))
    return rows


def _cell(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64:  # a sha256: its first 16 hex digits
        return value[:16]
    return repr(value)


def markdown(rows: list[Row], against_label: str) -> str:
    """The table: value, against, working tree, equal?"""
    lines = [f"| value | against ({against_label}) | {WORKING} | equal? |", "|---|---|---|---|"]
    lines += [f"| {r.name} | {_cell(r.against)} | {_cell(r.working)} | {r.status} |" for r in rows]
    return "\n".join(lines)


def exit_status(rows: list[Row]) -> int:
    return 1 if any(r.status == DIFFERENT for r in rows) else 0


def summary_line(rows: list[Row]) -> str:
    """How many values present on both sides differ, and how many are on one side only."""
    both = [r for r in rows if r.status in (EQUAL, DIFFERENT)]
    differ = sum(r.status == DIFFERENT for r in both)
    verdict = f"{differ} of {len(both)} values differ" if differ else f"all {len(both)} values are bit-identical"
    return f"{verdict}; {len(rows) - len(both)} values are present on one side only"


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, check=True, capture_output=True, text=True).stdout.strip()


@contextlib.contextmanager
def worktree(commit: str, parent: Path) -> Iterator[Path]:
    """A detached `git worktree` of `commit` under `parent`, removed (and pruned) on exit."""
    path = parent / "against"
    _git("worktree", "add", "--detach", str(path), commit)
    try:
        yield path
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=REPO, capture_output=True)
        subprocess.run(["git", "worktree", "prune"], cwd=REPO, capture_output=True)


def run_pipeline(source: Path, workdir: Path, config: str) -> float:
    """Runs the pipeline from the checkout `source` into `workdir` with this Python; its seconds. Its console
    output goes to `<workdir>.stderr`; a failure raises with the tail of it."""
    env = {**os.environ, "PYTHONPATH": str(source), "DPWAVE_DP_SECRET_SEED": SECRET_SEED}
    log = workdir.with_name(workdir.name + ".stderr")
    start = time.perf_counter()
    with log.open("w") as err:
        result = subprocess.run([sys.executable, "-m", "dpwave.main", f"--config={config}", f"--workdir={workdir}"],
                                cwd=source, env=env,
                                stdout=subprocess.DEVNULL, stderr=err, check=False)
    if result.returncode:
        tail = "\n".join(log.read_text().splitlines()[-20:])
        raise RuntimeError(f"the pipeline at {source} exited {result.returncode} ({log}):\n{tail}")
    return time.perf_counter() - start


def machine() -> str:
    """This machine and toolchain, the scope within which the comparison is bit for bit."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in ("jax", "jaxlib"))
    return f"{cpu}, {os.cpu_count()} CPUs, {versions}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"


def write_outputs(out: Path, rows: list[Row], header: dict[str, Any], table: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    record = {**header, "rows": [{**dataclasses.asdict(r), "against": None if r.against is ABSENT else r.against,
                                  "working": None if r.working is ABSENT else r.working} for r in rows]}
    (out / "regress.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / "regress.md").write_text("\n".join(f"{k}: {v}  " for k, v in header.items()) + "\n\n" + table + "\n")
    print(f"wrote {out / 'regress.json'} and {out / 'regress.md'}")


def regress(against: str, config: str, runs: Path, out: Path | None) -> int:
    """Both runs into `runs`, the comparison printed (and written under `out`); the exit status."""
    commit = _git("rev-parse", "--verify", f"{against}^{{commit}}")
    label = f"{against} = {commit[:10]}"
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    header = {"against": f"{label} {_git('log', '-1', '--format=%s', commit)}",
              "working_tree": f"{_git('rev-parse', '--short=10', 'HEAD')}{' + uncommitted changes' if dirty else ''}",
              "config": f"DPWAVE_DP_SECRET_SEED={SECRET_SEED} {config}", "machine": machine()}
    for key, value in header.items():
        print(f"{key}: {value}")
    for name in ("against", "working"):
        if (runs / name).exists():
            raise RuntimeError(f"{runs / name} exists (its finished stages would be skipped); give an empty --workdir")
    with tempfile.TemporaryDirectory(prefix="regress-src-") as src, worktree(commit, Path(src)) as checkout:
        print(f"running the pipeline at {label} in {checkout} ...", flush=True)
        print(f"  {run_pipeline(checkout, runs / 'against', config):.0f} s", flush=True)
    print(f"running the pipeline at the {WORKING} ...", flush=True)
    print(f"  {run_pipeline(REPO, runs / 'working', config):.0f} s", flush=True)
    rows = compare(collect(runs / "against"), collect(runs / "working"))
    table = markdown(rows, label)
    print(table)
    print(summary_line(rows))
    if out is not None:
        write_outputs(out, rows, header, table)
    return exit_status(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, help="the git revision to compare with (e.g. HEAD, a sha)")
    parser.add_argument("--config", default=CONFIG, help=f"the pipeline config (default {CONFIG})")
    parser.add_argument("--out", type=Path, help="write regress.json and regress.md here")
    parser.add_argument("--workdir", type=Path, help="keep the two runs here (default: a temporary directory)")
    args = parser.parse_args(argv)
    try:
        if args.workdir is not None:  # absolute: each pipeline runs in its own checkout
            args.workdir.mkdir(parents=True, exist_ok=True)
            return regress(args.against, args.config, args.workdir.resolve(), args.out)
        with tempfile.TemporaryDirectory(prefix="regress-runs-") as runs:
            return regress(args.against, args.config, Path(runs), args.out)
    except (subprocess.CalledProcessError, RuntimeError) as e:
        detail = e.stderr.strip() if isinstance(e, subprocess.CalledProcessError) else str(e)
        print(f"regress: {detail}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
