"""``mnist5k_style``: the mnist5k digits in a style the public split lacks (italic, thick strokes).

The style-shift experiment keeps ``mnist5k/public`` (upright digits with MNIST's thin strokes) as the public
data and reads the private, held-out and test splits from here: the same digits, labels and splits (row for
row) restyled by `restyle`, so what the DP stage must learn is a style, in all ten classes.
"""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds
from scipy import ndimage

from dpwave.data.builders.mnist5k import Mnist5k, mnist5k_arrays

SHEAR = 0.3  # horizontal shift per row, in pixels per pixel above the centre (italic, leaning right)
_STROKE = ndimage.generate_binary_structure(2, 1)  # 3x3 cross: strokes grow by one pixel on every side


def restyle(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 1) uint8 digits sheared into italics (bilinear, about the centre), then thickened by a grey
    dilation with a 3x3 cross. Deterministic."""
    height = images.shape[1]
    # Output pixel (y, x) reads input (y, x - SHEAR * (centre - y)): rows above the centre move right.
    matrix = np.array([[1.0, 0.0], [SHEAR, 1.0]])
    offset = np.array([0.0, -SHEAR * (height - 1) / 2])
    out = np.empty_like(images)
    for i, image in enumerate(images[..., 0].astype(np.float32)):
        sheared = ndimage.affine_transform(image, matrix, offset=offset, order=1, mode="constant")
        thick = ndimage.grey_dilation(sheared, footprint=_STROKE)
        out[i, ..., 0] = np.clip(np.rint(thick), 0, 255).astype(np.uint8)
    return out


class Mnist5kStyle(Mnist5k, skip_registration=True):
    """mnist5k restyled by `restyle` (italic shear 0.3, strokes thickened by a 3x3 grey dilation): the same
    splits (``private`` always private), labels and CSV rows; ids ``mnist5k_style-<row>``."""

    name = "mnist5k_style"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    ID_PREFIX = "mnist5k_style"

    def images(self) -> tuple[np.ndarray, np.ndarray]:
        images, labels = mnist5k_arrays()
        return restyle(images), labels
