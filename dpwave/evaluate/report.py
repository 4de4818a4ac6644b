"""One call that scores a set of generated samples: `evaluate_samples`.

Reference sets: FD-cls and precision/recall compare the samples with `real_test` in the
features of a classifier trained on `heldout` (neither seen by any generator, and the
feature network never sees `real_test`); FD-lowpass compares their 8x8 low-pass images
with `real_test`'s (no network); the same classifier labels the samples for the
conditioning accuracy; downstream accuracy trains on the samples and tests on `real_test`
once; memorization compares pixel distances to `private_train` and `heldout`. A metric that
cannot be computed from what was passed is None with a reason under "reasons"; malformed
input raises ValueError.
"""
from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from dpwave.evaluate.classifier import Classifier, TrainConfig, classifier_features, predict_from_features
from dpwave.evaluate.conditioning import conditioning_accuracy
from dpwave.evaluate.downstream import downstream_accuracy
from dpwave.evaluate.fid import inception_features
from dpwave.evaluate.frechet import frechet_distance
from dpwave.evaluate.images import as_images, as_labeled, check_labels
from dpwave.evaluate.inception_weights import load_inception
from dpwave.evaluate.lowpass import FD_LOWPASS_NAME, lowpass_frechet_distance
from dpwave.evaluate.memorization import memorization
from dpwave.evaluate.precision_recall import precision_recall
from dpwave.evaluate.surrogate import FD_CLS_NAME, train_feature_classifier
from dpwave.validation import float_images

METRICS = ("fd_cls", "fd_lowpass", "precision", "recall", "cond_accuracy", "downstream_accuracy",
           "memorization_ratio", "fid")


def _names(k: int) -> dict[str, str]:
    return {
        "fd_cls": FD_CLS_NAME,
        "fd_lowpass": FD_LOWPASS_NAME,
        "precision": f"improved precision (Kynkaanniemi et al. 2019, k={k}, FD-cls features)",
        "recall": f"improved recall (Kynkaanniemi et al. 2019, k={k}, FD-cls features)",
        "cond_accuracy": "conditioning accuracy: share of samples the FD-cls classifier labels as their prompted "
                         "class (chance 1/classes)",
        "downstream_accuracy": "downstream accuracy on the real test split (DPImageBench: train on "
                               "synthetic, select on a synthetic validation split)",
        "memorization_ratio": "memorization ratio: median d_private/d_heldout of samples over that of "
                              "held-out images (pixels; ~1 none, << 1 copies)",
        "fid": "FID (InceptionV3 pool3, pytorch-fid weights)",
    }


def _conditioning(classifier: Classifier, feats: np.ndarray, prompts: np.ndarray, test_feats: np.ndarray,
                  test_labels: np.ndarray) -> tuple[float, dict[str, Any]]:
    """Conditioning accuracy of the samples (features `feats`) and its details: per class, and the ceiling
    (the classifier's accuracy on the real test images)."""
    cond = conditioning_accuracy(predict_from_features(classifier, feats), prompts,
                                 num_classes=classifier.head.out_features)
    ceiling = float(np.mean(predict_from_features(classifier, test_feats) == test_labels))
    return cond.accuracy, {"per_class": cond.per_class, "counts": cond.counts,
                           "classifier_real_test_accuracy": ceiling}


def evaluate_samples(samples: np.ndarray, sample_labels: np.ndarray | None, *, real_test: Any,
                     heldout: Any | None, private_train: Any | None, classifier: Classifier | None = None,
                     num_classes: int | None = None, inception_weights: str | os.PathLike | None = None,
                     downstream_config: TrainConfig = TrainConfig(), k: int = 3) -> dict[str, Any]:
    """Scores `samples` (uint8 or [-1, 1] NHWC, labels or None); returns the report dict.

    real_test, heldout: (images, labels) or {"image", "label"} batches; private_train:
    images (labels ignored). `classifier` defaults to one trained on `heldout`.
    The result holds each metric in METRICS as a float or None, "names", "reasons" (why
    a metric is None), "details", and "notes". The memorization check reads private data;
    its output is an audit for the data owner and is not differentially private.
    """
    x = float_images(samples, name="samples")
    y = None if sample_labels is None else check_labels(sample_labels, len(x), name="sample_labels")
    test_images, test_labels = as_labeled(real_test, name="real_test")
    test_x = float_images(test_images, name="real_test images")
    held = None if heldout is None else as_labeled(heldout, name="heldout")
    if num_classes is None:
        num_classes = int(max(test_labels.max(), -1 if held is None else held[1].max())) + 1
    report: dict[str, Any] = {m: None for m in METRICS}
    reasons: dict[str, str] = {}
    details: dict[str, Any] = {"num_samples": len(x), "num_real_test": len(test_x), "num_classes": num_classes}

    if min(len(x), len(test_x)) >= 2:
        report["fd_lowpass"] = lowpass_frechet_distance(x, test_x)
    else:
        reasons["fd_lowpass"] = "needs at least 2 samples and 2 real test images"

    if classifier is None and held is not None:
        classifier = train_feature_classifier(held, num_classes=num_classes)
    if classifier is None:
        for m in ("fd_cls", "precision", "recall", "cond_accuracy"):
            reasons[m] = "no feature classifier: pass `classifier` or labeled `heldout` images"
    else:
        feats, test_feats = classifier_features(classifier, x), classifier_features(classifier, test_x)
        if min(len(x), len(test_x)) >= 2:
            report["fd_cls"] = frechet_distance(feats, test_feats)
        else:
            reasons["fd_cls"] = "needs at least 2 samples and 2 real test images"
        if min(len(x), len(test_x)) > k:
            report["precision"], report["recall"] = precision_recall(test_feats, feats, k=k)
        else:
            reasons["precision"] = reasons["recall"] = f"needs more than k={k} samples and real test images"
        if y is None:
            reasons["cond_accuracy"] = "samples are unlabeled (sample_labels=None): no prompts to agree with"
        else:
            report["cond_accuracy"], details["conditioning"] = _conditioning(classifier, feats, y, test_feats,
                                                                             test_labels)

    if y is None:
        reasons["downstream_accuracy"] = "samples are unlabeled (sample_labels=None)"
    elif len(x) < 10:
        reasons["downstream_accuracy"] = f"needs at least 10 labeled samples for train/validation, got {len(x)}"
    else:
        down = downstream_accuracy(x, y, (test_x, test_labels), num_classes=num_classes, config=downstream_config)
        report["downstream_accuracy"] = down.test_accuracy
        details["downstream"] = {"val_accuracy": down.val_accuracy, "best_epoch": down.best_epoch,
                                 "num_train": down.num_train, "num_val": down.num_val}

    if private_train is None or held is None or len(held[0]) < 2:
        reasons["memorization_ratio"] = "needs private_train and at least 2 heldout images"
    else:
        private_x = float_images(as_images(private_train, name="private_train"), name="private_train images")
        mem = memorization(x, private_x, float_images(held[0], name="heldout images"))
        report["memorization_ratio"] = mem.memorization_ratio
        details["memorization"] = mem._asdict()

    if inception_weights is None:
        reasons["fid"] = "no InceptionV3 weights file given (inception_weights=None); see FD-cls"
    else:
        model = load_inception(inception_weights)
        report["fid"] = frechet_distance(inception_features(x, model), inception_features(test_x, model))

    for m in METRICS:
        if report[m] is not None and not math.isfinite(report[m]):
            reasons[m], report[m] = f"non-finite result {report[m]!r}", None
    report.update(names=_names(k), reasons=reasons, details=details,
                  notes=[f"{FD_CLS_NAME} is comparable only across runs scored with the same feature "
                         "classifier; it is not FID.",
                         "FD-lowpass sees only the 8x8 low-pass images: it scores shape, not texture (read it "
                         "beside FD-cls, which texture can lower).",
                         "real_test is used only for final scores, never for model selection."])
    return report


def conditioning_line(details: dict[str, Any]) -> str | None:
    """The per-class conditioning accuracy in one line, with its ceiling; None when it was not measured."""
    cond = details.get("conditioning")
    if cond is None:
        return None
    classes = ", ".join(f"{c}: {'-' if a is None else f'{a:.2f}'}" for c, a in enumerate(cond["per_class"]))
    return (f"Conditioning accuracy per prompted class: {classes} (the classifier on real test images: "
            f"{cond['classifier_real_test_accuracy']:.2f})")


def format_report(report: dict[str, Any]) -> str:
    """A plain-text table of a report from `evaluate_samples`."""
    lines = []
    for m in METRICS:
        value = report[m]
        shown = f"{value:.4f}" if value is not None else f"n/a ({report['reasons'].get(m, 'not computed')})"
        lines.append(f"{report['names'][m]}: {shown}")
    if line := conditioning_line(report["details"]):
        lines.append(line)
    lines.extend(f"note: {n}" for n in report["notes"])
    return "\n".join(lines)
