"""dpwave.train.stages.generator: the DP-MERF generator fitted to the release (or, in the public-only control, to
the public embedding without private reads), and dpwave_merf's refined samples keeping its coarse band."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from helpers import runs

from dpwave import data, wavelets
from dpwave.train import merf, pipeline, settings
from dpwave.train.stages.generator import STAGE as GENERATOR
from dpwave.train.stages.sample import refiner_part


@pytest.mark.e2e
@pytest.mark.slow  # trains the refiner and evaluates: about a minute on 2 cores
def test_public_only_dpwave_merf_fits_the_public_embedding_without_private_reads(tmp_path, monkeypatch):
    config = runs.baseline_config("dpwave_merf", **{"dp.mechanism.target_epsilon": 0.0})
    assert runs.stage_names(config) == ["generator", "refiner", "sample", "evaluate"]
    opened = runs.forbid_private_reads(monkeypatch)
    assert pipeline.train_and_evaluate(config, str(tmp_path))
    assert ("private[:400]", True) in opened and not (tmp_path / "dp_embedding").exists()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (metrics["epsilon"], metrics["mode"], metrics["dp_step_flops"]) == (0.0, "public_only", None)


@pytest.mark.integration
@pytest.mark.slow  # trains the refiner: about 40 s on 2 cores
def test_dpwave_merf_samples_keep_the_generated_coarse_band(tmp_path):
    """Refining is post-processing: the images' coarse band is the generator's (up to uint8 rounding and the
    clipping of pixels to [-1, 1], which moves the mean of a clipped block)."""
    config = runs.baseline_config("dpwave_merf", **{"dp.mechanism.target_epsilon": 0.0})
    run = settings.read(config)
    for name in ("generator", "refiner"):
        assert runs.run_stage(config, tmp_path, name).finished
    graphdef, params = GENERATOR.restore_params(run, str(tmp_path / "generator"))
    labels = np.arange(8, dtype=np.int32) % 10
    out = merf.generate_many(run, graphdef, params, refiner_part(run, {"refiner": str(tmp_path / "refiner")}),
                             labels, jax.random.key(0), batch_size=8)
    assert set(out) == {"images", "coarse_images", "unrefined"}
    w = run.wavelet
    coarse = np.asarray(wavelets.coarse_image(data.to_float(out["images"]), w.levels, w.name, w.mode))
    generated = np.asarray(wavelets.coarse_image(data.to_float(out["coarse_images"]), w.levels, w.name, w.mode))
    clipped = (out["images"] == 0) | (out["images"] == 255)
    block = 2 ** w.levels
    unclipped = ~clipped.reshape(8, 8, block, 8, block, 1).any(axis=(2, 4))
    assert unclipped.mean() > 0.1
    assert np.max(np.abs(coarse - generated)[unclipped]) < 2 / 127.5
