"""Improved precision and recall (Kynkaanniemi et al., NeurIPS 2019).

Each set's manifold is the union of balls around its points, each ball's radius being the
distance to the point's k-th nearest neighbour in its own set. Precision is the fraction of
generated points inside the real manifold (are samples realistic?); recall is the fraction
of real points inside the generated manifold (is the real variety covered?).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from dpwave.evaluate.neighbors import as_points, inside_any_ball, kth_neighbor_radii


class PrecisionRecall(NamedTuple):
    precision: float
    recall: float


def manifold_coverage(queries: np.ndarray, manifold_points: np.ndarray, k: int) -> float:
    """Fraction of `queries` inside the k-NN-ball manifold of `manifold_points`."""
    radii = kth_neighbor_radii(manifold_points, k)
    return float(inside_any_ball(queries, manifold_points, radii).mean())


def precision_recall(real_features: np.ndarray, fake_features: np.ndarray, *, k: int = 3) -> PrecisionRecall:
    """Improved precision/recall of `fake_features` against `real_features` (both (N, D))."""
    real = as_points(real_features, name="real_features")
    fake = as_points(fake_features, name="fake_features")
    for name, pts in (("real_features", real), ("fake_features", fake)):
        if len(pts) <= k:
            raise ValueError(f"{name} has {len(pts)} points; k={k} needs at least {k + 1}")
    return PrecisionRecall(precision=manifold_coverage(fake, real, k), recall=manifold_coverage(real, fake, k))
