"""Dependencies point one way (docs/design.md, "Layers"): every `dpwave` import, read from the source, goes to a
lower layer, and the privacy package imports nothing but the leaf validation module."""
from __future__ import annotations

import ast
import pathlib

import pytest

import dpwave

pytestmark = pytest.mark.unit

# Top-level modules and packages of dpwave, lowest layer first; a unit may import only from earlier layers.
LAYERS = (
    {"validation"},
    {"files", "wavelets"},
    {"data", "privacy", "models", "grids", "evaluate"},
    {"generation", "console"},
    {"train"},
    {"main"},
)
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}
ROOT = pathlib.Path(dpwave.__file__).parent


def _unit(module: str) -> str:
    """`dpwave.train.stages.base` -> `train`."""
    return module.split(".")[1]


def _edges() -> set[tuple[str, str, str]]:
    """(importing file, its unit, imported unit) for every import of another dpwave unit."""
    edges = set()
    for path in ROOT.rglob("*.py"):
        source = _unit(".".join(("dpwave", *path.relative_to(ROOT).with_suffix("").parts)))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dpwave":
                names = [f"dpwave.{a.name}" for a in node.names] if node.module == "dpwave" else [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.split(".")[0] == "dpwave"]
            else:
                continue
            edges |= {(str(path.relative_to(ROOT)), source, _unit(n)) for n in names if _unit(n) != source}
    return edges


def test_every_unit_has_a_layer():
    units = {_unit(".".join(("dpwave", *p.relative_to(ROOT).with_suffix("").parts))) for p in ROOT.rglob("*.py")
             if p.name != "__init__.py" or p.parent != ROOT}
    assert units == set(RANK), "a new top-level unit of dpwave needs a place in LAYERS"


def test_imports_point_down():
    upward = sorted(e for e in _edges() if RANK[e[2]] >= RANK[e[1]])
    assert not upward, f"imports into the same or a higher layer (file, unit, imported unit): {upward}"


def test_privacy_imports_only_validation():
    assert {e[2] for e in _edges() if e[1] == "privacy"} <= {"validation"}
