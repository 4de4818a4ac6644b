"""Image grids and PNG files: tiling uint8 images, labelled sample sheets, atomic PNG writes.

A leaf module (numpy, PIL, `dpwave.files`, `dpwave.validation`): the metric writer, the sampler's
``samples.png`` and the demos all draw through it.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping

import numpy as np
from etils import epath
from PIL import Image, ImageDraw, ImageFont

from dpwave import files, validation

__all__ = ["image_grid", "sample_grid", "save_png"]


def image_grid(images: np.ndarray, nrow: int, *, padding: int = 2, pad_value: int = 0) -> np.ndarray:
    """Tiles `images` (N, H, W) or (N, H, W, C), uint8, into one (H', W', C) uint8 image.

    `nrow` is the number of images per row (as in torchvision); missing cells are `pad_value`.
    """
    images = validation.uint8_images(images, "images")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[0] == 0 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"images must have shape (N, H, W) or (N, H, W, C) with N >= 1 and C in "
                         f"(1, 3, 4), got {images.shape}.")
    if not isinstance(nrow, int) or nrow < 1:
        raise ValueError(f"nrow (images per row) must be an int >= 1, got {nrow!r}.")
    if padding < 0 or not 0 <= pad_value <= 255:
        raise ValueError(f"need padding >= 0 and 0 <= pad_value <= 255, got {padding}, {pad_value}.")
    n, h, w, c = images.shape
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, c), pad_value, np.uint8)
    for i in range(n):
        top = padding + (i // cols) * (h + padding)
        left = padding + (i % cols) * (w + padding)
        grid[top:top + h, left:left + w] = images[i]
    return grid


def save_png(path: files.PathLike, array: np.ndarray) -> epath.Path | None:
    """Writes a uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array as PNG, atomically, on process 0."""
    array = validation.single_image(array, "PNG array")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return files.write_bytes(path, buffer.getvalue())


def _grid_rows(rows: Mapping[str, np.ndarray], ncol: int) -> tuple[np.ndarray, int, int]:
    """All rows' first ``ncol`` images (zero-padded to ncol), as one (len(rows) * ncol, H, W, C) array."""
    arrays = []
    for label, images in rows.items():
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or len(images) == 0 \
                or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
            raise ValueError(f"row {label!r}: need uint8 images (N, H, W) or (N, H, W, 1|3) with N >= 1, got "
                             f"{images.dtype} {images.shape}; convert with dpwave.data.to_uint8")
        arrays.append(images if images.ndim == 4 else images[..., None])
    sizes = {a.shape[1:3] for a in arrays}
    if len(sizes) > 1:
        raise ValueError(f"rows have different image sizes {sorted(sizes)}; resize them to one size first")
    channels = max(a.shape[-1] for a in arrays)
    cells = []
    for a in arrays:
        a = np.repeat(a[:ncol], channels // a.shape[-1], axis=-1)
        cells.append(np.concatenate([a, np.zeros((ncol - len(a), *a.shape[1:]), np.uint8)]))
    h, _ = sizes.pop()
    return np.concatenate(cells), h, channels


def sample_grid(rows: Mapping[str, np.ndarray], path: files.PathLike, ncol: int, *,
                padding: int = 2) -> epath.Path | None:
    """One PNG with one labelled row per entry (e.g. real / coarse / refined / generated).

    Each row shows its first ``ncol`` uint8 images (fewer are padded with black); grayscale rows are
    shown as RGB when another row is RGB. Labels are drawn left of the rows in PIL's default font.
    """
    if not rows:
        raise ValueError("sample_grid needs at least one row, e.g. {'generated': images}")
    if isinstance(ncol, bool) or not isinstance(ncol, int) or ncol < 1:
        raise ValueError(f"ncol (images per row) must be an int >= 1, got {ncol!r}")
    cells, h, channels = _grid_rows(rows, ncol)
    grid = image_grid(cells, ncol, padding=padding)
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    boxes = [measure.textbbox((0, 0), str(label), font=font) for label in rows]
    label_width = max(box[2] for box in boxes) + 2 * padding
    canvas = Image.new("RGB" if channels == 3 else "L", (label_width + grid.shape[1], grid.shape[0]), 0)
    canvas.paste(Image.fromarray(grid if channels == 3 else grid[..., 0]), (label_width, 0))
    draw = ImageDraw.Draw(canvas)
    for i, (label, box) in enumerate(zip(rows, boxes)):
        top = padding + i * (h + padding) + (h - (box[3] - box[1])) // 2 - box[1]
        draw.text((padding, top), str(label), fill=(255, 255, 255) if channels == 3 else 255, font=font)
    return save_png(path, np.asarray(canvas))
