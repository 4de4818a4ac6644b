"""Conditioning accuracy: the held-out classifier's label against each sample's prompt."""
import json

import numpy as np
import pytest

from dpwave.evaluate.classifier import classifier_features, predict, predict_from_features
from dpwave.evaluate.conditioning import conditioning_accuracy
from dpwave.evaluate.report import conditioning_line, evaluate_samples
from dpwave.train.settings import CONDITIONS
from dpwave.train.stages.evaluate import COND_REASONS


@pytest.mark.unit
def test_perfect_prompts_score_one():
    prompts = np.arange(30) % 10
    cond = conditioning_accuracy(prompts, prompts, num_classes=10)
    assert cond.accuracy == 1.0 and cond.per_class == [1.0] * 10 and cond.counts == [3] * 10


@pytest.mark.unit
def test_per_class_counts_and_unprompted_classes():
    cond = conditioning_accuracy(np.array([0, 1, 1, 1, 0]), np.array([0, 0, 1, 1, 2]), num_classes=4)
    assert cond.accuracy == pytest.approx(3 / 5)
    assert cond.per_class == [0.5, 1.0, 0.0, None] and cond.counts == [2, 2, 1, 0]
    json.dumps(cond._asdict(), allow_nan=False)


@pytest.mark.unit
def test_labels_unrelated_to_prompts_score_chance():
    rng = np.random.default_rng(0)
    cond = conditioning_accuracy(rng.integers(0, 10, 20_000), np.arange(20_000) % 10, num_classes=10)
    assert cond.accuracy == pytest.approx(0.1, abs=0.01)
    assert all(a == pytest.approx(0.1, abs=0.025) for a in cond.per_class)


@pytest.mark.unit
def test_prompts_beyond_the_classifier_raise():
    with pytest.raises(ValueError, match="knows 3 classes"):
        conditioning_accuracy(np.zeros(4, int), np.array([0, 1, 2, 3]), num_classes=3)


@pytest.mark.unit
def test_real_digits_agree_with_their_labels_and_shuffled_labels_do_not(mnist, heldout_classifier):
    images, labels = mnist["test"]
    feats = classifier_features(heldout_classifier, images)
    predicted = predict_from_features(heldout_classifier, feats)
    np.testing.assert_array_equal(predicted, predict(heldout_classifier, images))
    true = conditioning_accuracy(predicted, labels, num_classes=10)
    shuffled = conditioning_accuracy(predicted, np.random.default_rng(0).permutation(labels), num_classes=10)
    assert true.accuracy > 0.85 and min(true.per_class) > 0.6
    assert shuffled.accuracy < 0.2


@pytest.mark.integration
def test_report_carries_the_overall_score_and_the_per_class_details(mnist, heldout_classifier):
    images, labels = mnist["public"][0][::5], mnist["public"][1][::5]  # 300 real digits, all classes
    report = evaluate_samples(images, labels, real_test=mnist["test"], heldout=None, private_train=None,
                              classifier=heldout_classifier, num_classes=10)
    cond = report["details"]["conditioning"]
    assert report["cond_accuracy"] > 0.85 and len(cond["per_class"]) == 10 and sum(cond["counts"]) == 300
    assert cond["classifier_real_test_accuracy"] > 0.85
    line = conditioning_line(report["details"])
    assert line.startswith("Conditioning accuracy per prompted class: 0: ") and "real test images" in line
    json.dumps(report, allow_nan=False)


@pytest.mark.integration
def test_caption_runs_get_none_with_a_reason(mnist):
    # What the evaluate stage passes for a caption run: no sample labels, no labeled heldout, dummy test labels.
    test_images = mnist["test"][0][:50]
    report = evaluate_samples(mnist["public"][0][:40], None, real_test=(test_images, np.zeros(50, np.int32)),
                              heldout=None, private_train=None, num_classes=None)
    assert report["cond_accuracy"] is None and "classifier" in report["reasons"]["cond_accuracy"]
    assert report["fd_lowpass"] is not None  # the texture-proof fidelity needs no labels
    assert conditioning_line(report["details"]) is None
    # The stage replaces that reason by the run's: every conditioning but class labels has one.
    assert set(COND_REASONS) == set(CONDITIONS) - {"label"}
    assert "caption" in COND_REASONS["caption"] and "no prompts" in COND_REASONS["none"]
