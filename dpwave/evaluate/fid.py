"""FID: Frechet distance between InceptionV3 pool3 features of two image sets."""
from __future__ import annotations

import os

import numpy as np

from dpwave.evaluate.batches import apply_in_batches
from dpwave.evaluate.frechet import frechet_distance
from dpwave.evaluate.inception import InceptionV3
from dpwave.evaluate.inception_weights import load_inception
from dpwave.validation import float_images


def inception_features(images: np.ndarray, model: InceptionV3, *, batch_size: int = 50,
                       name: str = "images") -> np.ndarray:
    """(N, 2048) float32 pool3 features; grayscale images are repeated to 3 channels."""
    x = float_images(images, name=name)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    elif x.shape[-1] != 3:
        raise ValueError(f"{name} must have 1 or 3 channels for InceptionV3, got {x.shape[-1]}")
    return apply_in_batches(model, "__call__", x, batch_size)


def fid(images_a: np.ndarray, images_b: np.ndarray, weights_path: str | os.PathLike, *,
        batch_size: int = 50) -> float:
    """FID between two image sets (uint8 or [-1, 1] NHWC) with the weights at `weights_path`.

    Raises InceptionWeightsError (a ValueError) explaining how to obtain the weights when
    the file is missing. Use thousands of images per set: FID is biased at small N.
    """
    model = load_inception(weights_path)
    return frechet_distance(inception_features(images_a, model, batch_size=batch_size, name="images_a"),
                            inception_features(images_b, model, batch_size=batch_size, name="images_b"))
