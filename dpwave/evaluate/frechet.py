"""Frechet distance between Gaussians fitted to two feature sets (the distance behind FID).

    d^2 = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^{1/2})

computed in float64. tr((S_a S_b)^{1/2}) equals the sum of the square roots of the
eigenvalues of the symmetric PSD matrix R S_b R with R = S_a^{1/2} (same eigenvalues as
S_a S_b). Working with symmetric eigendecompositions keeps the result real and handles
singular covariances (fewer samples than dimensions) without the complex round-off and
`eps * I` retry of the `sqrtm(S_a @ S_b)` route in the reference FID code; eigenvalues
that round-off pushes below zero are clamped to zero.

When both feature sets have fewer rows than dimensions (e.g. a few hundred 2048-d
Inception features), `frechet_distance` uses the equivalent cross-Gram form
tr((S_a S_b)^{1/2}) = ||X_a X_b^T||_* / sqrt((n_a - 1)(n_b - 1)) for centered X, whose
singular values are the square roots of the nonzero eigenvalues of S_a S_b: an
O(n_a n_b D) computation instead of O(D^3).
"""
from __future__ import annotations

import numpy as np

from dpwave.validation import check_finite


def _check_features(features: np.ndarray, name: str) -> np.ndarray:
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise ValueError(f"{name} must be (N, D), got shape {f.shape}")
    if f.shape[0] < 2:
        raise ValueError(f"{name} needs at least 2 rows for a covariance, got {f.shape[0]}")
    return check_finite(f, name)


def gaussian_stats(features: np.ndarray, *, name: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """Returns (mean, covariance) of `features` (N, D) in float64; needs N >= 2."""
    f = _check_features(features, name)
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance_from_stats(mu_a: np.ndarray, sigma_a: np.ndarray,
                                mu_b: np.ndarray, sigma_b: np.ndarray) -> float:
    """Squared Frechet distance between N(mu_a, sigma_a) and N(mu_b, sigma_b)."""
    mu_a, mu_b = np.atleast_1d(np.asarray(mu_a, np.float64)), np.atleast_1d(np.asarray(mu_b, np.float64))
    sigma_a, sigma_b = np.atleast_2d(np.asarray(sigma_a, np.float64)), np.atleast_2d(np.asarray(sigma_b, np.float64))
    d = mu_a.shape[0]
    for label, arr, shape in (("mu_a", mu_a, (d,)), ("mu_b", mu_b, (d,)),
                              ("sigma_a", sigma_a, (d, d)), ("sigma_b", sigma_b, (d, d))):
        if arr.shape != shape:
            raise ValueError(f"{label} must have shape {shape} (feature dim of mu_a), got {arr.shape}")
        check_finite(arr, label)
    for label, s in (("sigma_a", sigma_a), ("sigma_b", sigma_b)):
        if not np.allclose(s, s.T, rtol=1e-6, atol=1e-9 * max(1.0, np.abs(s).max())):
            raise ValueError(f"{label} must be a symmetric covariance matrix")
    root_a = _psd_sqrt((sigma_a + sigma_a.T) / 2)
    inner = root_a @ ((sigma_b + sigma_b.T) / 2) @ root_a
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)).sum()
    diff = mu_a - mu_b
    value = diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * tr_covmean
    return float(max(value, 0.0))


def _frechet_low_rank(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    xa, xb = a - mu_a, b - mu_b
    dof_a, dof_b = len(a) - 1, len(b) - 1
    tr_covmean = np.linalg.svd(xa @ xb.T, compute_uv=False).sum() / np.sqrt(dof_a * dof_b)
    diff = mu_a - mu_b
    value = diff @ diff + np.sum(xa * xa) / dof_a + np.sum(xb * xb) / dof_b - 2.0 * tr_covmean
    return float(max(value, 0.0))


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Squared Frechet distance between Gaussians fitted to two (N, D) feature sets."""
    a, b = _check_features(features_a, "features_a"), _check_features(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dims differ: {a.shape[1]} vs {b.shape[1]}; use the same feature network")
    if max(len(a), len(b)) < a.shape[1]:
        return _frechet_low_rank(a, b)
    return frechet_distance_from_stats(*gaussian_stats(a), *gaussian_stats(b))
