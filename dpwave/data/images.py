"""Pixel checks and image transforms shared by the builders and the sources.

Everything here works on numpy ``uint8`` arrays in HWC layout; PIL does decoding and resizing.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image

from dpwave import files
from dpwave.data.errors import InvalidExampleError

# ITU-R 601-2 luma, the weights PIL uses for RGB -> L.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
_RESAMPLE = Image.Resampling.LANCZOS


def as_uint8_pixels(pixels: np.ndarray, example_id: str) -> np.ndarray:
    """Validates decoded pixels and returns them as ``uint8`` HWC.

    Integer pixels must lie in [0, 255]; float pixels must be finite and lie in [0, 1] (they are
    scaled by 255 and rounded). A 2-D array gets a channel axis; the channel count must be 1-4.

    Raises:
      InvalidExampleError: naming ``example_id``, for a wrong shape, NaN/inf or out-of-range values.
    """
    pixels = np.asarray(pixels)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    if pixels.ndim != 3 or pixels.shape[-1] not in (1, 2, 3, 4) or min(pixels.shape[:2]) < 1:
        raise InvalidExampleError(
            f"example {example_id!r}: pixels have shape {pixels.shape}; expected (H, W) or "
            "(H, W, C) with C in 1..4 and H, W >= 1")
    if pixels.dtype == np.uint8:
        return pixels
    if np.issubdtype(pixels.dtype, np.floating):
        bad = int(np.size(pixels) - np.count_nonzero(np.isfinite(pixels)))
        if bad:
            raise InvalidExampleError(
                f"example {example_id!r}: {bad} pixel values are NaN or inf; fix or drop this image")
        low, high = float(pixels.min()), float(pixels.max())
        if low < 0.0 or high > 1.0:
            raise InvalidExampleError(
                f"example {example_id!r}: float pixels span [{low}, {high}]; float images must lie "
                "in [0, 1] (or be stored as 8-bit)")
        return np.rint(pixels.astype(np.float64) * 255.0).astype(np.uint8)
    if np.issubdtype(pixels.dtype, np.integer) or pixels.dtype == np.bool_:
        low, high = int(pixels.min()), int(pixels.max())
        if low < 0 or high > 255:
            raise InvalidExampleError(
                f"example {example_id!r}: integer pixels span [{low}, {high}], outside [0, 255]; "
                "convert the image to 8 bits per channel")
        return pixels.astype(np.uint8)
    raise InvalidExampleError(
        f"example {example_id!r}: unsupported pixel dtype {pixels.dtype}; use uint8 or float in [0, 1]")


def set_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """Converts a ``uint8`` HWC image to 1 (luma) or 3 (RGB) channels; alpha is dropped."""
    if channels not in (1, 3):
        raise ValueError(f"channels={channels!r} is not supported; use 1 (grayscale) or 3 (RGB)")
    have = image.shape[-1]
    if have in (2, 4):  # drop alpha
        image, have = image[..., : have - 1], have - 1
    if have == channels:
        return image
    if channels == 3:
        return np.repeat(image, 3, axis=-1)
    luma = image.astype(np.float32) @ _LUMA
    return np.clip(np.rint(luma), 0, 255).astype(np.uint8)[..., None]


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Center-crops a ``uint8`` HWC image to a square and resizes it to ``size`` x ``size``."""
    if size < 1:
        raise ValueError(f"size={size!r} must be a positive number of pixels")
    h, w, c = image.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    image = image[top: top + side, left: left + side]
    if side == size:
        return image
    pil = Image.fromarray(image[..., 0] if c == 1 else image)
    out = np.asarray(pil.resize((size, size), _RESAMPLE))
    return out.reshape(size, size, c)


def read_image_file(path: str | os.PathLike, example_id: str) -> np.ndarray:
    """Decodes an image file to pixels (``uint8``, or raw float/int for 'F'/'I' mode images).

    Raises:
      InvalidExampleError: naming ``example_id`` when the file cannot be decoded.
    """
    try:
        with files.as_path(path).open("rb") as f, Image.open(f) as pil:
            pil.load()
            if pil.mode in ("F", "I") or pil.mode.startswith("I;"):
                return np.asarray(pil)
            if pil.mode in ("1", "L"):
                return np.asarray(pil.convert("L"))
            return np.asarray(pil.convert("RGB"))
    except (OSError, Image.DecompressionBombError) as e:
        why = "not an image file PIL can read" if isinstance(e, Image.UnidentifiedImageError) else str(e)
        raise InvalidExampleError(f"example {example_id!r}: cannot decode image {os.fspath(path)!r}: {why}; repair or "
                                  "remove that file and rerun the same command") from e


def prepare_image(pixels: Any, example_id: str, resolution: int, channels: int) -> np.ndarray:
    """Validates, converts channels, center-crops and resizes: the builders' image pipeline.

    Returns:
      ``uint8`` array of shape ``(resolution, resolution, channels)``.
    """
    image = as_uint8_pixels(pixels, example_id)
    return center_crop_resize(set_channels(image, channels), resolution)


def to_float(images: Any) -> Any:
    """Maps ``uint8`` images (numpy or jax, any layout) to float32 in [-1, 1]."""
    dtype = getattr(images, "dtype", None)
    if dtype != np.uint8:
        raise ValueError(f"to_float expects uint8 images, got dtype {dtype}; pass the raw Source images")
    return images.astype(np.float32) / 127.5 - 1.0


def to_uint8(images: Any) -> np.ndarray:
    """Maps float images in [-1, 1] back to ``uint8`` (clipped, rounded); the inverse of ``to_float``."""
    images = np.asarray(images, dtype=np.float32)
    return np.clip(np.rint((images + 1.0) * 127.5), 0, 255).astype(np.uint8)
