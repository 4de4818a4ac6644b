"""Wavelet demo: pyramids and coarse images of real MNIST digits and scikit-image photos.

    python -m experiments.wavelet_demo --out workdir/wavelet_demo.png [--levels 3] [--wavelet haar]

Writes one PNG (per row: the image, its coarse image at every level, and the level-1 detail bands)
and prints the reconstruction error of decompose -> reconstruct for each image set.
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp
import numpy as np
import skimage.data
import skimage.transform

from dpwave import data, wavelets
from dpwave.grids import image_grid, save_png


def real_images(size: int) -> dict[str, np.ndarray]:
    """Float NHWC in [-1, 1]: six public mnist5k digits (grey) and four photos (RGB), `size` x `size`."""
    digits = data.load(data.DatasetSpec("mnist5k", "public", "public")).get_batch(np.arange(0, 1500, 250))["image"]
    digits = skimage.transform.resize(data.to_float(digits), (len(digits), size, size, 1), order=1)
    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(), skimage.data.rocket()]
    photos = np.stack([skimage.transform.resize(p[..., :3], (size, size), anti_aliasing=True) for p in photos])
    return {"mnist5k": digits.astype(np.float32), "photos": (2 * photos - 1).astype(np.float32)}


def pyramid_rows(images: np.ndarray, levels: int, wavelet: str) -> np.ndarray:
    """Per image: original, coarse images of levels 1..L (nearest-upsampled), |details| of level 1."""
    n, h, w, c = images.shape
    tiles = [images]
    for level in range(1, levels + 1):
        coarse = wavelets.coarse_image(jnp.asarray(images), level, wavelet)
        tiles.append(np.asarray(jnp.repeat(jnp.repeat(coarse, 2**level, axis=1), 2**level, axis=2))[:, :h, :w])
    finest = wavelets.decompose(jnp.asarray(images), levels, wavelet).details[-1]
    for band in finest:
        up = jnp.repeat(jnp.repeat(jnp.abs(band), 2, axis=1), 2, axis=2)[:, :h, :w]
        tiles.append(np.asarray(2 * up / jnp.maximum(up.max(), 1e-6) - 1))
    return np.stack(tiles, axis=1).reshape(n * len(tiles), h, w, c)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="workdir/wavelet_demo.png")
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--wavelet", default="haar")
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    grids = []
    for name, images in real_images(args.size).items():
        rec = wavelets.reconstruct(wavelets.decompose(jnp.asarray(images), args.levels, args.wavelet))
        print(f"{name}: {len(images)} images {images.shape[1:]}, {args.wavelet}, {args.levels} levels: "
              f"max |reconstruct(decompose(x)) - x| = {float(jnp.max(jnp.abs(rec - images))):.2e}")
        rows = data.to_uint8(pyramid_rows(images, args.levels, args.wavelet))
        if rows.shape[-1] == 1:
            rows = np.repeat(rows, 3, axis=-1)
        grids.append(image_grid(rows, nrow=args.levels + 4))
    width = max(g.shape[1] for g in grids)
    figure = np.concatenate([np.pad(g, ((0, 0), (0, width - g.shape[1]), (0, 0))) for g in grids])
    save_png(args.out, figure)
    print(f"wrote {args.out} (rows: image, coarse images of levels 1..{args.levels}, |H|, |V|, |D| of level 1)")


if __name__ == "__main__":
    main()
