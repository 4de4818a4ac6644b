"""dpwave.train.stages.dp_diffusion: the public-pretrained pixel flow model DP-SGD finetuned with the transformer
stage's mechanism and ledger (the sensitivity of its step: tests/privacy/test_pixel_flow_dp.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import runs

from dpwave.privacy import PrivacyLedger
from dpwave.train import pipeline, settings


@pytest.mark.e2e
@pytest.mark.slow  # about a minute on 2 cores; the sensitivity of its step is in tests/privacy/test_pixel_flow_dp.py
def test_dp_diffusion_pretrains_on_public_data_and_finetunes_with_dp_sgd(tmp_path):
    config = runs.baseline_config("dp_diffusion")
    assert runs.stage_names(config) == ["pixel_pretrain", "dp_diffusion", "sample", "evaluate"]
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
