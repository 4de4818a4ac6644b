"""A newcomer's read of the code, measured: the call walk of one DP update and of one sample, and the longest
functions.

    python -m experiments.callwalk --workdir=/tmp/callwalk --out=/tmp/callwalk.json

Runs the tiny pipeline (`experiments/configs/mnist.py:tiny`) with a `sys.setprofile` tracer on two windows:
the DP stage, from its `run` until its ledger records the first step (building the mechanism, the sampler and
the jitted step, the first Poisson draw and the step's trace), and the sample stage's `run`. For each it reports
the dpwave files and functions entered and the deepest chain of dpwave frames. It also lists the ten longest
functions under dpwave/. Run it on two checkouts (e.g. a `git worktree` of the older revision) to compare.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PACKAGE = str(REPO / "dpwave") + os.sep


class Tracer:
    """Records every dpwave function entered and the deepest chain of dpwave frames above one."""

    def __init__(self) -> None:
        self.functions: set[str] = set()
        self.deepest: list[str] = []

    def __call__(self, frame: Any, event: str, arg: Any) -> None:
        if event != "call" or not frame.f_code.co_filename.startswith(PACKAGE):
            return
        self.functions.add(_name(frame))
        chain, outer = [], frame
        while outer is not None:
            if outer.f_code.co_filename.startswith(PACKAGE):
                chain.append(_name(outer))
            outer = outer.f_back
        if len(chain) > len(self.deepest):
            self.deepest = chain[::-1]

    def report(self) -> dict[str, Any]:
        files = sorted({f.split(":")[0] for f in self.functions})
        return {"files": len(files), "functions": len(self.functions), "max_depth": len(self.deepest),
                "deepest": self.deepest, "file_list": files}


def _name(frame: Any) -> str:
    return f"{os.path.relpath(frame.f_code.co_filename, REPO)}:{frame.f_code.co_name}"


def _traced(fn: Callable, tracer: Tracer, done: Callable[[], None]) -> Callable:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        sys.setprofile(tracer)
        try:
            return fn(*args, **kwargs)
        finally:
            sys.setprofile(None)
            done()
    return wrapper


def longest_functions(count: int = 10) -> list[tuple[int, str]]:
    """(lines, `path:name`) of the longest functions under dpwave/."""
    found = []
    for path in sorted((REPO / "dpwave").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(REPO)}:{node.name}"))
    return sorted(found, reverse=True)[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a new directory for the tiny run")
    parser.add_argument("--out", default="/tmp/callwalk.json")
    args = parser.parse_args()

    from dpwave.privacy import ledger as ledger_lib
    from dpwave.train import pipeline
    from dpwave.train.stages import dp_finetune, sample
    from experiments.configs import mnist

    walks: dict[str, Any] = {}
    dp_tracer, sample_tracer = Tracer(), Tracer()
    record_steps = ledger_lib.PrivacyLedger.record_steps

    def first_step_recorded(self: Any, n: int) -> None:  # the DP window ends at the ledger's first step
        if "dp_update" not in walks:
            sys.setprofile(None)
            walks["dp_update"] = dp_tracer.report()
        record_steps(self, n)

    ledger_lib.PrivacyLedger.record_steps = first_step_recorded
    dp_finetune.STAGE.run = _traced(dp_finetune.STAGE.run, dp_tracer, lambda: None)
    sample.STAGE.run = _traced(sample.STAGE.run, sample_tracer,
                               lambda: walks.setdefault("sample", sample_tracer.report()))
    pipeline.train_and_evaluate(mnist.get_config("tiny"), args.workdir)

    result = {**walks, "longest_functions": longest_functions()}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("| walk | files | functions | deepest dpwave chain |\n|---|---|---|---|")
    for name in ("dp_update", "sample"):
        walk = walks[name]
        print(f"| {name} | {walk['files']} | {walk['functions']} | {walk['max_depth']} |")
        print(f"  deepest: {' > '.join(f.split(':')[1] for f in walk['deepest'])}")
    print("longest functions:", ", ".join(f"{name} {lines}" for lines, name in result["longest_functions"]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
