import numpy as np
import pytest
import scipy.linalg

from dpwave.evaluate.frechet import frechet_distance, frechet_distance_from_stats, gaussian_stats

pytestmark = pytest.mark.unit


def _features(rng, n, d, shift=0.0, scale=1.0):
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mixing * scale + shift


def _scipy_reference(a, b):
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s_a @ s_b).real
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2 * np.trace(covmean))


def test_identical_sets_give_zero():
    a = _features(np.random.default_rng(0), 400, 32)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9 * np.trace(np.cov(a, rowvar=False)))


def test_grows_with_mean_shift():
    rng = np.random.default_rng(1)
    a, b = _features(rng, 2000, 8), _features(np.random.default_rng(1), 2000, 8)
    values = [frechet_distance(a, b + s) for s in (0.0, 0.5, 1.0, 2.0)]
    assert values == sorted(values) and values[0] < 1e-9
    # Same covariance: the distance is exactly |shift|^2 summed over the 8 dims.
    assert values[3] == pytest.approx(8 * 2.0 ** 2, rel=1e-9)


def test_matches_scipy_sqrtm_reference():
    rng = np.random.default_rng(2)
    a, b = _features(rng, 600, 24), _features(rng, 500, 24, shift=0.3, scale=1.7)
    assert frechet_distance(a, b) == pytest.approx(_scipy_reference(a, b), rel=1e-6)


def test_singular_covariances_match_svd_reference():
    # 10 samples in 40 dims: both covariances have rank 9. For centered X_a, X_b,
    # tr((S_a S_b)^1/2) = nuclear norm of X_a X_b^T / sqrt((n_a - 1)(n_b - 1)).
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(10, 40)), rng.normal(size=(10, 40)) * 2 + 1
    xa, xb = a - a.mean(0), b - b.mean(0)
    tr_covmean = np.linalg.svd(xa @ xb.T, compute_uv=False).sum() / 9.0
    expected = (np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(np.cov(a, rowvar=False))
                + np.trace(np.cov(b, rowvar=False)) - 2 * tr_covmean)
    # Covariance route (symmetric eigendecompositions of 40 x 40 singular matrices).
    assert frechet_distance_from_stats(*gaussian_stats(a), *gaussian_stats(b)) == pytest.approx(expected, rel=1e-6)
    # Cross-Gram route (taken automatically when N < D).
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_low_rank_route_matches_covariance_route_with_unequal_sizes():
    rng = np.random.default_rng(6)
    a, b = _features(rng, 30, 64), _features(rng, 50, 64, shift=0.2, scale=0.5)
    via_stats = frechet_distance_from_stats(*gaussian_stats(a), *gaussian_stats(b))
    assert frechet_distance(a, b) == pytest.approx(via_stats, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_from_stats_equals_from_features():
    rng = np.random.default_rng(4)
    a, b = _features(rng, 300, 6), _features(rng, 300, 6, shift=1.0)
    stats = gaussian_stats(a) + gaussian_stats(b)
    assert frechet_distance_from_stats(*stats) == pytest.approx(frechet_distance(a, b), rel=1e-12)


def test_float32_input_is_computed_in_float64():
    a = _features(np.random.default_rng(5), 500, 16).astype(np.float32)
    b = a + np.float32(1e-3)
    # A float32 pipeline loses the 16 * 1e-6 mean term in the ~16-sized traces.
    assert frechet_distance(a, b) == pytest.approx(16e-6, rel=1e-3)


@pytest.mark.parametrize("a, b, match", [
    (np.zeros((5, 3)), np.zeros((5, 4)), "feature dims differ"),
    (np.zeros((1, 3)), np.zeros((5, 3)), "at least 2 rows"),
    (np.full((5, 3), np.nan), np.zeros((5, 3)), "NaN"),
    (np.zeros(5), np.zeros(5), r"\(N, D\)"),
])
def test_bad_features_raise(a, b, match):
    with pytest.raises(ValueError, match=match):
        frechet_distance(a, b)


def test_bad_stats_raise():
    with pytest.raises(ValueError, match="sigma_b must have shape"):
        frechet_distance_from_stats(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))
    with pytest.raises(ValueError, match="symmetric"):
        frechet_distance_from_stats(np.zeros(2), np.eye(2), np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]))
