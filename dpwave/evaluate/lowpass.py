"""FD-lowpass: a Frechet distance that stroke texture cannot buy.

Each image is reduced to its LOWPASS_SIDE x LOWPASS_SIDE low-pass: the mean of each (H/8) x (W/8) block
(the Haar coarse band of that level, up to scale; 8x8 for 32x32 digits, the band dpwave's DP stage models),
after a center crop to a multiple of the side. Everything finer than a block (stroke width, edges, grain,
texture) is averaged away; what is left is where the ink lies. Each low-pass image is then centered and
scaled to unit RMS, so total ink and contrast do not count either (thicker or fainter strokes of the right
shape cost little). FD-lowpass is the Frechet distance between Gaussians fitted to these vectors of the
samples and of real images: no network, no training, no seed.

On real MNIST (tests/evaluate/test_texture_vs_structure.py) it scores digits cut into 8x8 tiles and
reshuffled (the strokes' exact texture, no digit shape) far worse than blurred or block-averaged digits (the
shape without the texture), the order FD-cls gets backwards.
"""
from __future__ import annotations

import numpy as np

from dpwave.evaluate.frechet import frechet_distance
from dpwave.validation import float_images

LOWPASS_SIDE = 8
# A low-pass image flatter than this RMS (in [-1, 1] pixel units; blank) stays near zero instead of having its
# rounding noise scaled up to unit RMS.
RMS_FLOOR = 1e-2
FD_LOWPASS_NAME = (f"FD-lowpass (Frechet distance of the {LOWPASS_SIDE}x{LOWPASS_SIDE} low-pass images, each "
                   "centered and scaled to unit RMS: shape, not texture)")


def lowpass(images: np.ndarray, *, side: int = LOWPASS_SIDE, name: str = "images") -> np.ndarray:
    """(N, side * side * C) float64: each image's block-mean low-pass, centered and scaled to unit RMS."""
    x = float_images(images, name=name)
    n, h, w, c = x.shape
    if h < side or w < side:
        raise ValueError(f"{name} are {h}x{w}; the low-pass needs at least {side}x{side}")
    bh, bw = h // side, w // side
    top, left = (h - bh * side) // 2, (w - bw * side) // 2
    x = x[:, top:top + bh * side, left:left + bw * side].astype(np.float64)
    low = x.reshape(n, side, bh, side, bw, c).mean(axis=(2, 4)).reshape(n, -1)
    low -= low.mean(axis=1, keepdims=True)
    rms = np.sqrt(np.mean(low * low, axis=1, keepdims=True))
    return low / np.maximum(rms, RMS_FLOOR)


def lowpass_frechet_distance(samples: np.ndarray, real: np.ndarray) -> float:
    """FD-lowpass of `samples` against `real` (uint8 or [-1, 1] NHWC, same size; at least 2 of each)."""
    return frechet_distance(lowpass(samples, name="samples"), lowpass(real, name="real images"))
