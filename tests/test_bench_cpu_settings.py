"""The CPU settings benchmark: every setting it times is one this jaxlib and glibc accept."""

import os
import subprocess
import sys

import pytest

from experiments.bench import bench_cpu_settings

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("name", sorted(bench_cpu_settings.SETTINGS))
def test_every_setting_starts_jax(name):
    # XLA aborts the process on a flag it does not know (e.g. one renamed in a later jaxlib).
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | bench_cpu_settings.SETTINGS[name]
    code = "import jax.numpy as jnp; print(float((jnp.ones((8, 8)) @ jnp.ones((8, 8))).sum()))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "512.0", out.stderr[-2000:]
