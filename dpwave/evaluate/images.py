"""Input checks shared by the evaluation metrics: labels and the (images, labels) forms they accept.

Images arrive as NHWC numpy arrays, either uint8 in [0, 255] or floating point in [-1, 1] (the generator's
output range). Every metric converts them with `dpwave.validation.float_images`, so a bad array fails once,
with a message that names the fix.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

LabeledImages = tuple[np.ndarray, np.ndarray]


def check_labels(labels: Any, num_images: int, *, name: str = "labels") -> np.ndarray:
    """Returns `labels` as int32 of shape (num_images,), refusing negatives and non-integers."""
    y = np.asarray(labels)
    if y.shape != (num_images,):
        raise ValueError(f"{name} must have shape ({num_images},) to match the images, got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got dtype {y.dtype}")
    if num_images == 0:
        raise ValueError(f"{name} is empty; pass at least one labeled image")
    if y.min() < 0:
        raise ValueError(f"{name} must be >= 0, got minimum {y.min()}")
    return y.astype(np.int32)


def as_labeled(data: Any, *, name: str) -> LabeledImages:
    """Accepts `(images, labels)` or a batch dict `{"image": ..., "label": ...}`."""
    if isinstance(data, Mapping):
        if "image" not in data or "label" not in data:
            raise ValueError(f"{name} dict needs keys 'image' and 'label', got {sorted(data)}")
        images, labels = data["image"], data["label"]
    elif isinstance(data, tuple) and len(data) == 2:
        images, labels = data
    else:
        raise ValueError(
            f"{name} must be (images, labels) or {{'image': ..., 'label': ...}}, got {type(data).__name__}")
    images = np.asarray(images)
    return images, check_labels(labels, len(images), name=f"{name} labels")


def as_images(data: Any, *, name: str) -> np.ndarray:
    """Accepts an image array, `(images, labels)` or a batch dict with an 'image' key."""
    if isinstance(data, Mapping):
        if "image" not in data:
            raise ValueError(f"{name} dict needs key 'image', got {sorted(data)}")
        return np.asarray(data["image"])
    if isinstance(data, tuple) and len(data) == 2:
        return np.asarray(data[0])
    return np.asarray(data)
