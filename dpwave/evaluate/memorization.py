"""Memorization check: are samples closer to the private training set than fresh data is?

For a point x let d_P(x) be the distance to its nearest private training image and d_H(x)
to its nearest held-out image (pixels, or any feature space), and rho(x) = d_P(x) / d_H(x).
A generator that copies training images gives rho ~ 0 on its copies.

Raw rho is not ~1 without memorization when the two sets differ in size: a nearest
neighbour among 2,000 private images is closer than among 500 held-out ones. The private
set must be searched whole (a copy of any training image has to be found), so instead of
subsampling it the raw median is calibrated by the same statistic for real images that no
model saw: each held-out image h against the private set and the other held-out images,
rho(h) = d_P(h) / d_{H \\ h}(h). Hence

    memorization_ratio = median_g rho(g) / median_h rho(h)

is ~1 for samples that are fresh draws from the data distribution, << 1 when samples copy
training images, and > 1 when samples are far from all real data. Likewise, the fraction of
samples whose nearest private image is nearer than the nearest held-out one is compared
with its no-memorization value n_P / (n_P + n_H) (every real image is equally likely to be
the nearest one). The check reads private data and its result is not differentially private:
it is an audit for the data owner, not a number to publish.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from dpwave.evaluate.neighbors import as_points, kth_neighbor_radii, nearest_distances

_TINY = 1e-12  # floor for d_H: a sample equal to a held-out image has a huge, finite ratio


class Memorization(NamedTuple):
    memorization_ratio: float         # median rho(samples) / median rho(held-out), ~1 = none
    median_ratio: float               # median rho over samples, uncalibrated
    mean_ratio: float                 # mean rho over samples, uncalibrated
    null_median_ratio: float          # median rho over held-out images (leave-one-out)
    fraction_closer_to_private: float  # share of samples with d_P < d_H
    fraction_closer_null: float        # its value without memorization, n_P / (n_P + n_H)


def memorization(samples: np.ndarray, private: np.ndarray, heldout: np.ndarray) -> Memorization:
    """Nearest-neighbour memorization statistics of `samples` (arrays of shape (N, ...))."""
    s = as_points(samples, name="samples")
    p = as_points(private, name="private")
    h = as_points(heldout, name="heldout")
    if len(h) < 2:
        raise ValueError(f"heldout needs at least 2 images for the leave-one-out calibration, got {len(h)}")
    if not s.shape[1] == p.shape[1] == h.shape[1]:
        raise ValueError(f"samples, private and heldout differ in size per item: "
                         f"{s.shape[1]}, {p.shape[1]}, {h.shape[1]}")
    d_priv, d_held = nearest_distances(s, p), nearest_distances(s, h)
    rho = d_priv / np.maximum(d_held, _TINY)
    null_rho = nearest_distances(h, p) / np.maximum(kth_neighbor_radii(h, 1), _TINY)
    null_median = float(np.median(null_rho))
    return Memorization(
        memorization_ratio=float(np.median(rho)) / max(null_median, _TINY),
        median_ratio=float(np.median(rho)),
        mean_ratio=float(rho.mean()),
        null_median_ratio=null_median,
        fraction_closer_to_private=float(np.mean(d_priv < d_held)),
        fraction_closer_null=len(p) / (len(p) + len(h)),
    )
