import numpy as np
import pytest

from dpwave.evaluate.precision_recall import precision_recall

pytestmark = pytest.mark.unit


def _pixels(images):
    return images.reshape(len(images), -1).astype(np.float64) / 127.5 - 1.0


def test_identical_sets_have_full_precision_and_recall(mnist):
    x = _pixels(mnist["test"][0][:300])
    assert precision_recall(x, x) == (1.0, 1.0)


def test_disjoint_far_sets_have_zero_precision_and_recall():
    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(200, 16)), rng.normal(size=(150, 16)) + 100.0
    assert precision_recall(real, fake) == (0.0, 0.0)


def test_subset_collapse_lowers_recall_not_precision(mnist):
    real = _pixels(mnist["test"][0])
    images, labels = mnist["private"]
    rng = np.random.default_rng(0)
    fresh = _pixels(images[rng.choice(len(images), 600, replace=False)])
    collapsed = _pixels(images[np.isin(labels, [0, 1, 2])])  # 600 digits of 3 classes only
    full, mode_collapse = precision_recall(real, fresh), precision_recall(real, collapsed)
    assert full.precision > 0.8 and full.recall > 0.4
    assert mode_collapse.precision > full.precision - 0.03
    assert mode_collapse.recall < 0.75 * full.recall


def test_noise_lowers_precision(mnist):
    real = _pixels(mnist["test"][0])
    fake = _pixels(mnist["private"][0][:600])
    noisy = np.clip(fake + np.random.default_rng(1).normal(0.0, 0.5, fake.shape), -1, 1)
    assert precision_recall(real, noisy).precision < 0.5 * precision_recall(real, fake).precision


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="k=3 needs at least 4"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)))
    with pytest.raises(ValueError, match="point dims differ"):
        precision_recall(np.zeros((10, 2)), np.ones((10, 3)))
    with pytest.raises(ValueError, match="NaN"):
        precision_recall(np.full((10, 2), np.nan), np.zeros((10, 2)))
