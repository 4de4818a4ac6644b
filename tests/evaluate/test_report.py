import json

import numpy as np
import pytest

from dpwave.evaluate.classifier import TrainConfig
from dpwave.evaluate.inception_weights import InceptionWeightsError
from dpwave.evaluate.report import METRICS, evaluate_samples, format_report
from dpwave.evaluate.surrogate import FD_CLS_NAME

pytestmark = pytest.mark.integration

FAST = TrainConfig(epochs=8, seed=0)


def _subset(split, n, seed=0):
    images, labels = split
    idx = np.random.default_rng(seed).choice(len(images), n, replace=False)
    return images[idx], labels[idx]


@pytest.fixture(scope="module")
def good_report(mnist):
    # Fresh real digits (public split) stand in for a perfect generator's samples.
    samples, labels = _subset(mnist["public"], 600)
    batch = {"image": mnist["test"][0], "label": mnist["test"][1]}  # data-layer batch dicts work too
    return evaluate_samples(samples, labels, real_test=batch, heldout=mnist["heldout"],
                            private_train=mnist["private"][0], downstream_config=FAST)


def test_report_has_every_metric_and_is_json_safe(good_report):
    assert set(METRICS) <= good_report.keys()
    for m in METRICS:
        assert good_report[m] is None or np.isfinite(good_report[m])
    assert good_report["fid"] is None and "InceptionV3 weights" in good_report["reasons"]["fid"]
    assert set(good_report["reasons"]) == {"fid"}
    json.dumps(good_report, allow_nan=False)


def test_surrogate_is_named_in_dict_and_string(good_report):
    assert good_report["names"]["fd_cls"] == FD_CLS_NAME == "FD-cls (surrogate, not FID)"
    text = format_report(good_report)
    assert FD_CLS_NAME in text and "n/a" in text


def test_real_digits_score_like_real_data(good_report):
    assert 0.0 <= good_report["fd_cls"] < 5.0
    assert 0.0 <= good_report["fd_lowpass"] < 1.5
    assert good_report["cond_accuracy"] > 0.85
    assert good_report["precision"] > 0.6 and good_report["recall"] > 0.6
    assert good_report["downstream_accuracy"] > 0.8
    assert 0.85 < good_report["memorization_ratio"] < 1.15
    assert good_report["details"]["downstream"]["num_val"] == 60


def test_bad_samples_rank_worse(mnist, heldout_classifier, good_report):
    refs = dict(real_test=mnist["test"], heldout=mnist["heldout"], private_train=mnist["private"])
    noise = np.random.default_rng(0).integers(0, 256, (300, 32, 32, 1), dtype=np.uint8)
    noisy = evaluate_samples(noise, None, classifier=heldout_classifier, **refs)
    assert noisy["fd_cls"] > 10 * good_report["fd_cls"]
    assert noisy["fd_lowpass"] > 10 * good_report["fd_lowpass"]
    assert noisy["cond_accuracy"] is None and "unlabeled" in noisy["reasons"]["cond_accuracy"]
    assert noisy["precision"] < 0.05
    assert noisy["downstream_accuracy"] is None and "unlabeled" in noisy["reasons"]["downstream_accuracy"]
    copies = evaluate_samples(mnist["private"][0][::5], None, classifier=heldout_classifier, **refs)
    assert copies["memorization_ratio"] < 0.01


def test_missing_inputs_give_none_with_reasons(mnist):
    samples = mnist["public"][0][:20]
    report = evaluate_samples(samples, None, real_test=mnist["test"], heldout=None, private_train=None)
    assert report["fd_lowpass"] is not None  # needs only the samples and real_test
    for m in set(METRICS) - {"fd_lowpass"}:
        assert report[m] is None and report["reasons"][m]
    report = evaluate_samples(samples[:1], None, real_test=mnist["test"], heldout=None, private_train=None)
    assert report["fd_lowpass"] is None and "at least 2 samples" in report["reasons"]["fd_lowpass"]
    json.dumps(report, allow_nan=False)


def test_bad_input_raises(mnist):
    with pytest.raises(ValueError, match="must lie in"):
        evaluate_samples(np.full((4, 32, 32, 1), 2.0, np.float32), None, real_test=mnist["test"],
                         heldout=None, private_train=None)
    with pytest.raises(InceptionWeightsError, match="not found"):
        evaluate_samples(mnist["public"][0][:20], None, real_test=mnist["test"], heldout=None,
                         private_train=None, inception_weights="/nonexistent/inception.npz")
