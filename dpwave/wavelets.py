"""Multi-level 2-D discrete wavelet transforms of NHWC image batches.

The only module that imports jaxwt. Haar (the default) runs through an exact reshape-based
transform (it matches jaxwt/PyWavelets to float rounding and is several times faster); every other
PyWavelets discrete wavelet runs through `jaxwt.wavedec2` / `jaxwt.waverec2`, with the
`pywt.Wavelet` object closed over (never passed as a traced tuple, which jaxwt pads wrongly under
jit). Everything works under `jax.jit`, `jax.vmap` and `jax.grad`.

Band conventions follow PyWavelets: `details[i] = (horizontal, vertical, diagonal)`, ordered coarse to
fine (`details[0]` is level L, `details[-1]` is level 1). With Haar, level l bands have shape
(N, H/2^l, W/2^l, C); longer wavelets add boundary coefficients (PyWavelets' `dwt_coeff_len`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import jaxwt
import numpy as np
import pywt

from dpwave.validation import check_divisible_by_levels

SUPPORTED_MODES = ("symmetric", "reflect", "zero")

Bands = tuple[jax.Array, jax.Array, jax.Array]


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["coarse", "details"],
    meta_fields=["wavelet", "mode", "image_hw"],
)
@dataclasses.dataclass(frozen=True)
class Pyramid:
    """A multi-level wavelet decomposition of an NHWC batch.

    Attributes:
      coarse: the level-L approximation band, (N, h_L, w_L, C).
      details: per level, coarse to fine, the (horizontal, vertical, diagonal) bands.
      wavelet: PyWavelets name of the wavelet.
      mode: boundary mode.
      image_hw: (H, W) of the images this pyramid reconstructs to.
    """

    coarse: jax.Array
    details: tuple[Bands, ...]
    wavelet: str
    mode: str
    image_hw: tuple[int, int]

    @property
    def levels(self) -> int:
        return len(self.details)

    def scales(self) -> list[jax.Array]:
        """Scale-ordered bands: [coarse, level L details, ..., level 1 details].

        Detail bands of one level are stacked on the channel axis as (H, V, D), giving (N, h, w, 3C).
        """
        return [self.coarse] + [jnp.concatenate(bands, axis=-1) for bands in self.details]

    def with_scales(self, scales: Sequence[jax.Array]) -> Pyramid:
        """Inverse of `scales()`: a pyramid with the same metadata and the given bands."""
        if len(scales) != self.levels + 1:
            raise ValueError(f"expected {self.levels + 1} scales (coarse + {self.levels} levels), got {len(scales)}")
        details = tuple(tuple(jnp.split(s, 3, axis=-1)) for s in scales[1:])
        return dataclasses.replace(self, coarse=scales[0], details=details)

    def to_patches(self, patch_sizes: Sequence[int]) -> list[jax.Array]:
        """Token-friendly view: per scale (coarse first), (N, num_patches, p*p*channels)."""
        if len(patch_sizes) != self.levels + 1:
            raise ValueError(f"need one patch size per scale ({self.levels + 1}), got {list(patch_sizes)}")
        return [patchify(s, p) for s, p in zip(self.scales(), patch_sizes)]

    def from_patches(self, patches: Sequence[jax.Array], patch_sizes: Sequence[int]) -> Pyramid:
        """Inverse of `to_patches`, using this pyramid's band shapes as the template."""
        hw = [s.shape[1:3] for s in self.scales()]
        return self.with_scales([unpatchify(t, p, h, w) for t, p, (h, w) in zip(patches, patch_sizes, hw)])


def patchify(x: jax.Array, patch: int) -> jax.Array:
    """(N, H, W, C) -> (N, (H/p)*(W/p), p*p*C), patches in row-major order."""
    n, h, w, c = x.shape
    if h % patch or w % patch:
        raise ValueError(f"band of size {h}x{w} is not divisible by patch size {patch}; pick a divisor")
    x = x.reshape(n, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(tokens: jax.Array, patch: int, h: int, w: int) -> jax.Array:
    """Inverse of `patchify` for a band of spatial size (h, w)."""
    n, _, d = tokens.shape
    c = d // (patch * patch)
    x = tokens.reshape(n, h // patch, w // patch, patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, h, w, c)


def _as_wavelet(wavelet: str) -> pywt.Wavelet:
    if not isinstance(wavelet, str):
        raise TypeError(f"wavelet must be a PyWavelets name such as 'haar' or 'db2', got {type(wavelet).__name__}")
    if wavelet not in pywt.wavelist(kind="discrete"):
        raise ValueError(
            f"unknown wavelet {wavelet!r}: use a discrete PyWavelets wavelet, one of pywt.wavelist(kind='discrete')"
        )
    return pywt.Wavelet(wavelet)


def max_levels(height: int, width: int, wavelet: str = "haar") -> int:
    """Most levels for which every level still has full filter support and halves exactly."""
    w = _as_wavelet(wavelet)
    by_filter = pywt.dwt_max_level(min(height, width), w.dec_len)
    by_divisibility = min((height & -height).bit_length() - 1, (width & -width).bit_length() - 1)
    return min(by_filter, by_divisibility)


def _validate(images: jax.Array, levels: int, wavelet: str, mode: str) -> None:
    if mode not in SUPPORTED_MODES:
        raise ValueError(
            f"unsupported wavelet boundary mode {mode!r}: jaxwt implements {SUPPORTED_MODES} correctly; choose one"
        )
    _as_wavelet(wavelet)
    if images.ndim != 4:
        raise ValueError(f"images must be NHWC (rank 4), got shape {tuple(images.shape)}; add a batch/channel axis")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"images must be floating point, got {images.dtype}; convert uint8 with dpwave.data.to_float")
    if not isinstance(levels, int) or levels < 1:
        raise ValueError(f"levels must be an int >= 1, got {levels!r}")
    _, h, w, _ = images.shape
    check_divisible_by_levels(h, w, levels)
    most = max_levels(h, w, wavelet)
    if levels > most:
        raise ValueError(f"{levels} levels is beyond what {h}x{w} images allow with {wavelet!r}: at most {most}")


def _haar_analysis(x: jax.Array) -> tuple[jax.Array, Bands]:
    a, b = x[:, 0::2, 0::2], x[:, 0::2, 1::2]
    c, d = x[:, 1::2, 0::2], x[:, 1::2, 1::2]
    s, t = a + b, a - b
    u, v = c + d, c - d
    return (s + u) * 0.5, ((s - u) * 0.5, (t + v) * 0.5, (t - v) * 0.5)


def _haar_synthesis(ll: jax.Array, bands: Bands) -> jax.Array:
    hh, vv, dd = bands
    a = (ll + hh + vv + dd) * 0.5
    b = (ll + hh - vv - dd) * 0.5
    c = (ll - hh + vv - dd) * 0.5
    d = (ll - hh - vv + dd) * 0.5
    n, h, w, ch = ll.shape
    top = jnp.stack([a, b], axis=3).reshape(n, h, 2 * w, ch)
    bottom = jnp.stack([c, d], axis=3).reshape(n, h, 2 * w, ch)
    return jnp.stack([top, bottom], axis=2).reshape(n, 2 * h, 2 * w, ch)


def _nchw(x: jax.Array) -> jax.Array:
    return jnp.moveaxis(x, -1, 1)


def _nhwc(x: jax.Array) -> jax.Array:
    return jnp.moveaxis(x, 1, -1)


def decompose(images: jax.Array, levels: int, wavelet: str = "haar", mode: str = "symmetric") -> Pyramid:
    """Multi-level 2-D DWT of NHWC float images (any batch size, any number of channels)."""
    _validate(images, levels, wavelet, mode)
    hw = (int(images.shape[1]), int(images.shape[2]))
    if wavelet == "haar":
        details = []
        coarse = images
        for _ in range(levels):
            coarse, bands = _haar_analysis(coarse)
            details.append(bands)
        return Pyramid(coarse, tuple(reversed(details)), wavelet, mode, hw)
    coeffs = jaxwt.wavedec2(_nchw(images), _as_wavelet(wavelet), mode=mode, level=levels)
    details = tuple(tuple(_nhwc(b) for b in bands) for bands in coeffs[1:])
    return Pyramid(_nhwc(coeffs[0]), details, wavelet, mode, hw)


def reconstruct(pyramid: Pyramid) -> jax.Array:
    """Exact inverse of `decompose`: NHWC images of size `pyramid.image_hw`."""
    if pyramid.wavelet == "haar":
        x = pyramid.coarse
        for bands in pyramid.details:
            x = _haar_synthesis(x, bands)
        return x
    coeffs = [_nchw(pyramid.coarse)] + [tuple(_nchw(b) for b in bands) for bands in pyramid.details]
    x = _nhwc(jaxwt.waverec2(coeffs, _as_wavelet(pyramid.wavelet)))
    h, w = pyramid.image_hw
    return x[:, :h, :w, :]


def band_gain(levels: int, wavelet: str = "haar") -> float:
    """Factor by which L levels of 2-D analysis scale a constant image in the coarse band (2^L for
    PyWavelets' orthonormal and biorthogonal filters)."""
    return float(np.sum(_as_wavelet(wavelet).dec_lo)) ** (2 * levels)


def coarse_image(images: jax.Array, levels: int, wavelet: str = "haar", mode: str = "symmetric") -> jax.Array:
    """The coarse band rescaled to the input's pixel range: the 'coarse image intermediary'."""
    return decompose(images, levels, wavelet, mode).coarse / band_gain(levels, wavelet)


def coarse_only(pyramid: Pyramid) -> Pyramid:
    """The same pyramid with every detail band zeroed (what a coarse-only decode reconstructs)."""
    return dataclasses.replace(pyramid, details=jax.tree.map(jnp.zeros_like, pyramid.details))


def upsample_coarse(coarse: jax.Array, levels: int, image_hw: tuple[int, int], wavelet: str = "haar",
                    method: str = "bicubic") -> jax.Array:
    """Resize a coarse band (in band units) to full resolution in pixel units (the no-refiner baseline)."""
    n, _, _, c = coarse.shape
    pixels = coarse / band_gain(levels, wavelet)
    return jax.image.resize(pixels, (n, *image_hw, c), method=method)

