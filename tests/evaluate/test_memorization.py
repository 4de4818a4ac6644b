import numpy as np
import pytest

from dpwave.evaluate.memorization import memorization

pytestmark = pytest.mark.unit


def _float(images):
    return images.astype(np.float32) / 127.5 - 1.0


@pytest.fixture(scope="module")
def refs(mnist):
    return _float(mnist["private"][0]), _float(mnist["heldout"][0])


def test_copies_of_private_images_are_flagged(mnist, refs):
    private, heldout = refs
    copies = memorization(private[::7], private, heldout)
    assert copies.memorization_ratio < 1e-3 and copies.fraction_closer_to_private == 1.0
    noisy = np.clip(private[::7] + np.random.default_rng(0).normal(0, 0.1, private[::7].shape), -1, 1)
    near_copies = memorization(noisy, private, heldout)
    assert near_copies.memorization_ratio < 0.4 and near_copies.fraction_closer_to_private > 0.95


def test_fresh_samples_from_the_same_distribution_score_about_one(mnist, refs):
    private, heldout = refs
    fresh = memorization(_float(mnist["test"][0]), private, heldout)
    assert 0.9 < fresh.memorization_ratio < 1.1
    # 2000 private vs 500 held-out images: the raw ratio is biased low, the null says by how much.
    assert fresh.median_ratio < 0.95 and fresh.null_median_ratio < 0.95
    assert fresh.fraction_closer_null == 0.8
    assert abs(fresh.fraction_closer_to_private - 0.8) < 4 * np.sqrt(0.8 * 0.2 / 1000)


def test_copies_of_heldout_images_are_not_memorization(mnist, refs):
    private, heldout = refs
    result = memorization(heldout[:50], private, heldout)
    assert result.memorization_ratio > 1e3 and result.fraction_closer_to_private == 0.0
    assert np.isfinite(result.mean_ratio)


def test_bad_inputs_raise(refs):
    private, heldout = refs
    with pytest.raises(ValueError, match="at least 2"):
        memorization(private[:3], private, heldout[:1])
    with pytest.raises(ValueError, match="differ in size"):
        memorization(private[:3, :16, :16], private, heldout)
