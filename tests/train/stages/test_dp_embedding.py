"""dpwave.train.stages.dp_embedding: the DP-MERF release through the pipeline, accounted and stated as one
release, restored (never drawn again) on resume, the noised mean of the private embedding, and stale only when the
features' settings change."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import runs

from dpwave.privacy import DpParams, PrivacyLedger
from dpwave.train import loop, merf, pipeline, settings
from dpwave.train.stages.base import restore_state
from dpwave.train.stages.dp_embedding import STAGE as DP_EMBEDDING
from dpwave.train.stages.dp_embedding import template
from dpwave.train.stages.generator import STAGE as GENERATOR


def released(workdir: Path, config) -> dict[str, np.ndarray]:
    state = restore_state(str(workdir / "dp_embedding"), template(settings.read(config)))
    return {k: np.asarray(v) for k, v in state.items()}


@pytest.mark.e2e
def test_dp_merf_releases_once_states_it_and_a_resume_restores_the_release(tmp_path, monkeypatch):
    config = runs.baseline_config("dp_merf")
    assert runs.stage_names(config) == ["dp_embedding", "generator", "sample", "evaluate"]
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
    config = runs.baseline_config("dp_merf")
    assert runs.run_stage(config, tmp_path, "dp_embedding").finished
    run = settings.read(config)
    source = run.data.load("private")
    exact = jax.tree.map(lambda v: np.asarray(v) / len(source), merf.embedding_sum(run, merf.features(run), source))
    noise = np.concatenate([np.ravel(released(tmp_path, config)[k] - exact[k]) for k in exact]) * len(source)
    assert abs(noise.std() - 1.0) < 0.05 and abs(noise.mean()) < 0.05


@pytest.mark.integration
def test_the_release_inputs_ignore_dp_sgd_and_generator_settings():
    """dp.mechanism.steps and dp.mechanism.expected_batch_size are DP-SGD's and merf.steps etc. the generator's:
    changing them never makes a finished release stale (a new release would spend epsilon again); the features'
    settings do."""
    base = pipeline.stage_inputs(settings.read(runs.baseline_config("dp_merf")))
    other = pipeline.stage_inputs(settings.read(runs.baseline_config("dp_merf", **{
        "dp.mechanism.steps": 7, "dp.mechanism.expected_batch_size": 8, "merf.steps": 9, "merf.learning_rate": 0.5})))
    assert other["dp_embedding"] == base["dp_embedding"] and other["generator"] != base["generator"]
    features = pipeline.stage_inputs(settings.read(runs.baseline_config("dp_merf", **{"merf.num_features": 100})))
    assert features["dp_embedding"] != base["dp_embedding"]
    assert DP_EMBEDDING.dp and not GENERATOR.dp  # the release is the run's one DP stage
