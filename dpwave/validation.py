"""Input checks shared across packages: integers, finite numbers, finite arrays, image arrays and wavelet-compatible
sizes.

A leaf module (numpy only). Every check raises ``ValueError`` with a message that names the input and the
fix; data-file problems are `dpwave.data.errors.InvalidExampleError` instead (they name the file).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["check_divisible_by_levels", "check_finite", "check_int", "check_number", "float_images", "int_in_range",
           "is_int", "single_image", "uint8_images"]


def is_int(value: Any) -> bool:
    """A Python or numpy integer (bools excluded)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_int(name: str, value: Any, minimum: int) -> None:
    if not is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_number(name: str, value: Any, *, positive: bool) -> None:
    """A finite Python int or float (bools excluded), > 0 with `positive`, else >= 0."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        raise ValueError(f"{name} must be a finite Python number {'> 0' if positive else '>= 0'}, got {value!r}.")


def int_in_range(name: str, value: Any, low: int, high: int | None = None) -> int:
    """`value` as an int; refuses bools, non-integers and values outside [low, high] (`high` None: no upper bound)."""
    if not is_int(value):
        raise ValueError(f"{name}={value!r} must be an int")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name}={value!r} must be {bound}")
    return int(value)


def check_finite(array: np.ndarray, name: str) -> np.ndarray:
    """``array`` unchanged; refuses NaN and inf."""
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or inf ({int(np.sum(~np.isfinite(array)))} values)")
    return array


def check_divisible_by_levels(height: int, width: int, levels: int) -> None:
    """Refuses image sizes a ``levels``-level wavelet transform cannot halve ``levels`` times."""
    step = 2**levels
    if height % step or width % step:
        raise ValueError(
            f"image size {height}x{width} is not divisible by 2^levels = {step}; resize/pad to a multiple of "
            f"{step} or use fewer levels")


def uint8_images(images: Any, what: str) -> np.ndarray:
    """``images`` as a numpy array; refuses any dtype but uint8."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8, got {images.dtype}; convert with "
                         "np.clip(np.round(x * 255), 0, 255).astype(np.uint8).")
    return images


def single_image(image: Any, what: str) -> np.ndarray:
    """One uint8 image (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)."""
    image = uint8_images(image, what)
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (1, 3, 4)):
        raise ValueError(f"{what} must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {image.shape}.")
    return image


def float_images(images: Any, *, name: str = "images") -> np.ndarray:
    """``images`` (uint8 in [0, 255] or float in [-1, 1], NHWC, N >= 1) as float32 NHWC in [-1, 1]."""
    x = np.asarray(images)
    if x.ndim != 4:
        raise ValueError(
            f"{name} must be NHWC (4-D), got shape {x.shape}; add a channel axis for "
            f"grayscale (images[..., None]) or a batch axis for one image (images[None])")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {x.shape}); pass at least one image")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 127.5 - 1.0
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(
            f"{name} has dtype {x.dtype}; pass uint8 in [0, 255] (e.g. images.astype(np.uint8)) "
            f"or floats in [-1, 1]")
    check_finite(x, name)
    lo, hi = float(x.min()), float(x.max())
    if lo < -1.0 - 1e-6 or hi > 1.0 + 1e-6:
        raise ValueError(
            f"float {name} must lie in [-1, 1], got [{lo:.4g}, {hi:.4g}]; clip them "
            f"(np.clip(images, -1, 1)) or rescale uint8 data with images / 127.5 - 1")
    return x.astype(np.float32)
