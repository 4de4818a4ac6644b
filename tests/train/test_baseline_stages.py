"""The baselines through the pipeline. DP-MERF: one release accounted and stated as such, restored (never drawn
again) on resume, no private data outside the release, the public-only control, the refiner keeping the released
coarse band. The DP-finetuned pixel flow model: the DP-SGD mechanism and ledger of the transformer's stage."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import runs

from dpwave import data, wavelets
from dpwave.privacy import DpParams, PrivacyLedger
from dpwave.train import loop, merf, pipeline, settings
from dpwave.train.stages.dp_embedding import STAGE as DP_EMBEDDING
from dpwave.train.stages.dp_embedding import template
from dpwave.train.stages.generator import STAGE as GENERATOR
from dpwave.train.stages.sample import refiner_part
from dpwave.train.stages.base import restore_state

SMALL = {"merf.num_features": 200, "merf.steps": 4, "merf.batch_size": 20, "refiner.steps": 2,
         "diffusion.steps": 2, "dp.mechanism.steps": 3,
         "sample.num_samples": 20, "sample.batch_size": 10, "eval.feature_epochs": 1, "eval.downstream_epochs": 1,
         "eval.num_real": 50}


def stage_names(config) -> list[str]:
    return [stage.name for stage in pipeline.stages(settings.read(config))]


def merf_config(method: str, **overrides):
    return runs.tiny_config({"method": method, **SMALL, **overrides})


def released(workdir: Path, config) -> dict[str, np.ndarray]:
    state = restore_state(str(workdir / "dp_embedding"), template(settings.read(config)))
    return {k: np.asarray(v) for k, v in state.items()}


@pytest.mark.e2e
def test_dp_merf_releases_once_states_it_and_a_resume_restores_the_release(tmp_path, monkeypatch):
    config = merf_config("dp_merf")
    assert stage_names(config) == ["dp_embedding", "generator", "sample", "evaluate"]
    workdir = tmp_path / "run"
    assert pipeline.train_and_evaluate(config, str(workdir))

    metrics = json.loads((workdir / "metrics.json").read_text())
    ledger = PrivacyLedger(DpParams(noise_multiplier=1.0, sampling_prob=1.0, delta=1e-5, dataset_size=400))
    ledger.record_steps(1)
    assert metrics["dp_steps"] == 1 and metrics["epsilon"] == pytest.approx(ledger.epsilon())
    assert metrics["dp_step_flops"] > 0
    statement = (workdir / "privacy_statement.txt").read_text()
    assert "1 release(s) of a mean embedding (DP-MERF)" in statement and "DP-SGD" not in statement
    assert "q: 1;" in statement and "N=400" in statement
    assert oct((workdir / "dp_embedding").stat().st_mode & 0o777) == "0o700"  # the DP stage is owner-only
    with np.load(workdir / "sample" / "samples.npz") as f:
        assert f["images"].shape == (20, 32, 32, 1) and list(f["labels"][:10]) == list(range(10))

    first = released(workdir, config)
    # A crash after the release's checkpoint but before its summary: the rerun restores the release and its ledger
    # (one step), it never draws the noise again.
    for name in ("dp_embedding", "generator", "sample", "evaluate"):
        (workdir / name / "summary.json").unlink()

    def no_second_release(*args):
        raise AssertionError("the rerun summed the private embedding again instead of restoring the release")

    monkeypatch.setattr(merf, "embedding_sum", no_second_release)
    assert pipeline.train_and_evaluate(config, str(workdir))
    again = released(workdir, config)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    summary = loop.read_summary(str(workdir / "dp_embedding"))
    assert summary["steps"] == 1 and summary["epsilon"] == pytest.approx(ledger.epsilon())


@pytest.mark.integration
def test_the_release_is_the_noised_mean_of_the_private_embedding(tmp_path):
    """The released embedding minus the noiseless private mean is Gaussian noise of std sigma / N per coordinate
    (sigma 1 here): the release reads the private set, and noises it once."""
    config = merf_config("dp_merf")
    assert runs.run_stage(config, tmp_path, "dp_embedding").finished
    run = settings.read(config)
    source = run.data.load("private")
    exact = jax.tree.map(lambda v: np.asarray(v) / len(source), merf.embedding_sum(run, merf.features(run), source))
    noise = np.concatenate([np.ravel(released(tmp_path, config)[k] - exact[k]) for k in exact]) * len(source)
    assert abs(noise.std() - 1.0) < 0.05 and abs(noise.mean()) < 0.05


@pytest.mark.e2e
@pytest.mark.slow  # trains the refiner and evaluates: about a minute on 2 cores
def test_public_only_dpwave_merf_fits_the_public_embedding_without_private_reads(tmp_path, monkeypatch):
    config = merf_config("dpwave_merf", **{"dp.mechanism.target_epsilon": 0.0})
    assert stage_names(config) == ["generator", "refiner", "sample", "evaluate"]
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
    config = merf_config("dpwave_merf", **{"dp.mechanism.target_epsilon": 0.0})
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


@pytest.mark.integration
def test_merf_methods_refuse_captions_and_bad_settings():
    with pytest.raises(ValueError, match="caption conditioning"):
        settings.read(merf_config("dp_merf", **{"data.condition": "caption", "data.num_classes": None}))
    with pytest.raises(ValueError, match=r"config.merf.num_features=201 must be even"):
        settings.read(merf_config("dp_merf", **{"merf.num_features": 201}))
    with pytest.raises(ValueError, match=r"config.merf.count_weight=1.0 must be in \(0, 1\)"):
        settings.read(merf_config("dp_merf", **{"merf.count_weight": 1.0}))


@pytest.mark.integration
def test_the_release_inputs_ignore_dp_sgd_and_generator_settings():
    """dp.mechanism.steps and dp.mechanism.expected_batch_size are DP-SGD's and merf.steps etc. the generator's:
    changing them never makes a finished release stale (a new release would spend epsilon again); the features'
    settings do."""
    base = pipeline.stage_inputs(settings.read(merf_config("dp_merf")))
    other = pipeline.stage_inputs(settings.read(merf_config("dp_merf", **{
        "dp.mechanism.steps": 7, "dp.mechanism.expected_batch_size": 8, "merf.steps": 9, "merf.learning_rate": 0.5})))
    assert other["dp_embedding"] == base["dp_embedding"] and other["generator"] != base["generator"]
    features = pipeline.stage_inputs(settings.read(merf_config("dp_merf", **{"merf.num_features": 100})))
    assert features["dp_embedding"] != base["dp_embedding"]
    assert DP_EMBEDDING.dp and not GENERATOR.dp  # the release is the run's one DP stage


@pytest.mark.e2e
@pytest.mark.slow  # about a minute on 2 cores; the sensitivity of its step is in tests/privacy/test_pixel_flow_dp.py
def test_dp_diffusion_pretrains_on_public_data_and_finetunes_with_dp_sgd(tmp_path):
    config = merf_config("dp_diffusion")
    assert stage_names(config) == ["pixel_pretrain", "dp_diffusion", "sample", "evaluate"]
    assert pipeline.train_and_evaluate(config, str(tmp_path))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    run = settings.read(config)
    ledger = PrivacyLedger(run.dp.mechanism.build(400).params)
    ledger.record_steps(3)
    assert metrics["dp_steps"] == 3 and metrics["epsilon"] == pytest.approx(ledger.epsilon())
    assert metrics["dp_step_flops"] > 0 and metrics["method"] == "dp_diffusion"
    assert "3 DP-SGD steps" in (tmp_path / "privacy_statement.txt").read_text()
    with np.load(tmp_path / "sample" / "samples.npz") as f:
        assert f["images"].shape == (20, 32, 32, 1) and f["coarse_images"].shape == (20, 32, 32, 1)


@pytest.mark.integration
def test_dp_diffusion_refuses_transformer_parameter_groups():
    with pytest.raises(ValueError, match="dp.recipe.trainable='all' and dp.recipe.lora_rank=0"):
        settings.read(merf_config("dp_diffusion", **{"dp.recipe.trainable": "cond"}))
