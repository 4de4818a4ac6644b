"""Exact nearest-neighbour queries in float64, chunked so memory stays O(chunk * N)."""
from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from dpwave.validation import check_finite

_CHUNK = 512


def as_points(x: np.ndarray, *, name: str) -> np.ndarray:
    """Flattens (N, ...) to float64 (N, D), refusing empty or non-finite input."""
    p = np.asarray(x, dtype=np.float64)
    if p.ndim < 2 or p.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (N, ...) array, got shape {p.shape}")
    return check_finite(p.reshape(p.shape[0], -1), name)


def _distance_chunks(queries: np.ndarray, reference: np.ndarray) -> Iterator[tuple[slice, np.ndarray]]:
    """Yields (row slice, Euclidean distances of those queries to every reference point)."""
    if queries.shape[1] != reference.shape[1]:
        raise ValueError(f"point dims differ: {queries.shape[1]} vs {reference.shape[1]}")
    ref_sq = np.einsum("ij,ij->i", reference, reference)
    for start in range(0, len(queries), _CHUNK):
        rows = slice(start, start + _CHUNK)
        q = queries[rows]
        sq = np.einsum("ij,ij->i", q, q)[:, None] + ref_sq[None, :] - 2.0 * (q @ reference.T)
        yield rows, np.sqrt(np.maximum(sq, 0.0))


def _reduce(queries: np.ndarray, reference: np.ndarray,
            fn: Callable[[np.ndarray], np.ndarray], dtype: type) -> np.ndarray:
    """Applies a row-wise reduction `fn` to the query-to-reference distance matrix."""
    out = np.empty(len(queries), dtype)
    for rows, d in _distance_chunks(queries, reference):
        out[rows] = fn(d)
    return out


def nearest_distances(queries: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Distance from each query to its nearest reference point, (Nq,)."""
    return _reduce(queries, reference, lambda d: d.min(axis=1), np.float64)


def kth_neighbor_radii(points: np.ndarray, k: int) -> np.ndarray:
    """Distance from each point to its k-th nearest other point in the same set, (N,)."""
    if not 1 <= k < len(points):
        raise ValueError(f"k must be in [1, {len(points) - 1}] for {len(points)} points, got {k}")
    return _reduce(points, points, lambda d: np.partition(d, k, axis=1)[:, k], np.float64)


def inside_any_ball(queries: np.ndarray, centers: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Whether each query lies within distance radii[j] of some center j, (Nq,) bool."""
    return _reduce(queries, centers, lambda d: (d <= radii[None, :]).any(axis=1), bool)
