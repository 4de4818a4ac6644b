"""Shared test setup: CPU only, float32 everywhere, quiet logs; the test tiers and the test seed.

Tiers (markers registered in setup.cfg): every test carries exactly one of `unit`, `integration` or `e2e`, as a
module `pytestmark` or on the test itself; collection fails otherwise. `slow` is separate and deselected by default.
"""
import os

import pytest
from helpers import seeds

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

TIERS = ("unit", "integration", "e2e")


def pytest_report_header() -> str:
    return f"dpwave test seed: {seeds.TEST_SEED} (DPWAVE_TEST_SEED)"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    wrong = [f"{item.nodeid}: {tiers or 'none'}" for item in items
             if len(tiers := sorted({m.name for m in item.iter_markers() if m.name in TIERS})) != 1]
    if wrong:
        raise pytest.UsageError("each test needs exactly one tier marker (pytest.mark.unit, integration or e2e; "
                                "a module pytestmark or one on the test):\n" + "\n".join(wrong))
