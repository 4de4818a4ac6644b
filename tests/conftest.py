"""Shared test setup: CPU only, float32 everywhere, quiet logs; the test tiers and the test seed.

Tiers (markers registered in setup.cfg): every test is `unit`, `integration` or `e2e`. A module or test marker
sets it; otherwise the module's default below applies (unlisted modules hold unit tests). `slow` is separate
and deselected by default.
"""
import os

import pytest
from helpers import seeds

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

TIERS = ("unit", "integration", "e2e")
# Test modules (paths under tests/, or a folder ending in "/") whose tests are integration tests by default:
# several modules together, a builder preparing a dataset, a stage, a subprocess.
INTEGRATION = ("train/", "data/test_caption_builders.py", "data/test_image_folder.py", "data/test_mnist5k.py",
               "data/test_official.py", "data/test_private_boundary.py", "evaluate/test_report.py",
               "test_configs.py", "test_launch.py", "test_pipeline.py", "test_reproduce.py")
_ROOT = os.path.dirname(os.path.abspath(__file__))


def pytest_report_header() -> str:
    return f"dpwave test seed: {seeds.TEST_SEED} (DPWAVE_TEST_SEED)"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(item.get_closest_marker(tier) for tier in TIERS):
            continue
        module = os.path.relpath(str(item.path), _ROOT).replace(os.sep, "/")
        default = any(module == p or (p.endswith("/") and module.startswith(p)) for p in INTEGRATION)
        item.add_marker("integration" if default else "unit")
