"""FD-cls: the Frechet distance used where the FID InceptionV3 weights are unavailable.

Features are the penultimate layer of a small CNN trained only on held-out real images
that no generator saw (mnist5k's `heldout` split). It ranks runs that share the same
feature classifier; its scale has nothing to do with FID, so every result carries the
name FD_CLS_NAME.
"""
from __future__ import annotations

from typing import Any

from dpwave.evaluate.classifier import Classifier, TrainConfig, train_classifier
from dpwave.evaluate.images import as_labeled

FD_CLS_NAME = "FD-cls (surrogate, not FID)"
FEATURE_CLASSIFIER_CONFIG = TrainConfig(epochs=15, seed=0)


def train_feature_classifier(heldout: Any, *, num_classes: int,
                             config: TrainConfig = FEATURE_CLASSIFIER_CONFIG) -> Classifier:
    """The FD-cls feature network, trained on `heldout` = (images, labels) for a fixed number of epochs."""
    images, labels = as_labeled(heldout, name="heldout")
    return train_classifier(images, labels, num_classes=num_classes, config=config).model
