"""Real MNIST for the evaluation tests: the mnist5k splits (public 1500, private 2000, heldout 500,
test 1000; class-balanced, disjoint; 32x32x1 uint8) read through dpwave.data."""
from __future__ import annotations

import numpy as np
import pytest

from dpwave import data
from dpwave.evaluate.surrogate import train_feature_classifier

SPLITS = ("public", "private", "heldout", "test")


@pytest.fixture(scope="session")
def mnist() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (uint8 images (N, 32, 32, 1), int labels (N,))}."""
    out = {}
    for split in SPLITS:
        source = data.load(data.DatasetSpec("mnist5k", split, "private" if split == "private" else "public"))
        batch = source.get_batch(np.arange(len(source)))
        out[split] = (batch["image"], np.asarray(batch["label"], np.int64))
    return out


@pytest.fixture(scope="session")
def heldout_classifier(mnist):
    """The FD-cls feature network: trained on the heldout split only."""
    return train_feature_classifier(mnist["heldout"], num_classes=10)
