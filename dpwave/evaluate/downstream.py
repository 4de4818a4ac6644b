"""Downstream utility under the DPImageBench protocol.

A classifier is trained on labeled synthetic images; the checkpoint (epoch) is chosen on a
validation split held out from the SYNTHETIC images, never on real data; the chosen model
is then scored once on the real test split. `real_test` is not even converted to an array
before selection is over, so nothing about it can leak into the choice.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from dpwave.evaluate.classifier import TrainConfig, accuracy, train_classifier
from dpwave.evaluate.images import as_labeled, check_labels


class DownstreamResult(NamedTuple):
    test_accuracy: float              # real test split, chosen checkpoint, measured once
    val_accuracy: float               # synthetic validation split, chosen checkpoint
    best_epoch: int
    history: list[dict[str, float]]   # per epoch: loss, val_accuracy
    num_train: int
    num_val: int


def split_synthetic(num: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seed-fixed (train, val) index split of `num` synthetic images; both non-empty."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    num_val = round(num * val_fraction)
    if num_val < 1 or num - num_val < 1:
        raise ValueError(f"{num} synthetic images cannot be split with val_fraction={val_fraction}; "
                         f"generate more samples")
    order = np.random.default_rng([seed, 1]).permutation(num)
    return np.sort(order[num_val:]), np.sort(order[:num_val])


def downstream_accuracy(synthetic_images: np.ndarray, synthetic_labels: np.ndarray, real_test: Any, *,
                        num_classes: int, val_fraction: float = 0.1,
                        config: TrainConfig = TrainConfig()) -> DownstreamResult:
    """Train on synthetic data, select on synthetic validation, test once on `real_test`.

    `real_test` is `(images, labels)` or `{"image": ..., "label": ...}`.
    """
    images = np.asarray(synthetic_images)
    labels = check_labels(synthetic_labels, len(images), name="synthetic labels")
    train_idx, val_idx = split_synthetic(len(images), val_fraction, config.seed)
    fit = train_classifier(images[train_idx], labels[train_idx], num_classes=num_classes, config=config,
                           validation=(images[val_idx], labels[val_idx]))
    test_images, test_labels = as_labeled(real_test, name="real_test")
    if test_labels.max() >= num_classes:
        raise ValueError(f"real_test labels reach {test_labels.max()} but num_classes is {num_classes}")
    return DownstreamResult(
        test_accuracy=accuracy(fit.model, test_images, test_labels),
        val_accuracy=fit.history[fit.best_epoch - 1]["val_accuracy"],
        best_epoch=fit.best_epoch,
        history=fit.history,
        num_train=len(train_idx),
        num_val=len(val_idx),
    )
