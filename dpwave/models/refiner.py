"""High-frequency refiner: super-resolution in wavelet space (Flax NNX), trained on public data only.

From the level-L coarse band the refiner predicts the detail bands level by level, L down to 1. At
level l a small conv net (one per level) sees the current approximation band a_l (the coarse band at
l = L, below it the reconstruction of the level above from a_{l+1} and its predicted details) and
yields the three detail bands (H, V, D) of that level, so `wavelets.reconstruct` gives the image.

Objectives (`RefinerConfig.objective`):

* ``"flow"`` (default): conditional flow matching with x-prediction. On the straight path
  x_t = (1 - t) z + t d from Gaussian noise z to the true details d, the net predicts d from
  (a_l, x_t, t) under an L2 loss; sampling integrates the velocity (d_hat - x_t) / (1 - t) with
  `sample_steps` Euler steps. Its first prediction (t = 0) is the conditional mean; the later steps
  commit to one sharp sample, whose detail energy matches real details.
* ``"regression"``: the same net maps a_l to d_l under an L2 loss; it predicts the conditional mean,
  which is smooth (detail energy well below the truth). Kept as the measured baseline.

Bands enter the nets in fixed units that do not depend on the data: a level-l band divided by
`band_gain(l)` is in pixel units, so for images in [-1, 1] (`dpwave.data.to_float`, the project's
convention) approximations lie in [-1, 1] and so do Haar details. `cond_noise` adds Gaussian noise (in
those units) to the approximation each net is conditioned on during training, which makes the refiner
robust to a coarse band decoded from a VQ tokenizer.

Functional use: the model holds parameters only, so ``graphdef, params = nnx.split(model, nnx.Param)``
and `refiner_loss(graphdef, params, batch, rng)` is a pure function of a batch shard.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dpwave import wavelets
from dpwave.validation import check_int

OBJECTIVES = ("flow", "regression")
_DTYPES = ("float32", "bfloat16", "float16")
_TIME_FEATURES = 64


@dataclasses.dataclass(frozen=True)
class RefinerConfig:
    """Architecture and sampling of `Refiner`; hashable (a static jit argument inside the graphdef).

    Attributes:
      image_size: side of the square images (pixels).
      channels: image channels C (the nets output 3C detail bands).
      levels: wavelet levels L; the refiner starts from the level-L coarse band.
      wavelet, mode: as in `wavelets.decompose`.
      widths: conv width of each level's net, coarse (level L) first; one entry per level.
      num_blocks: residual blocks per level net.
      num_classes: class-label conditioning when set (labels then required), none when None.
      objective: "flow" (conditional flow matching, sharp) or "regression" (L2, conditional mean).
      sample_steps: Euler steps per level at sampling ("flow" only).
      cond_noise: std of Gaussian noise added to the conditioning band in training (normalized units).
      dtype: activation dtype; parameters are always float32.
    """

    image_size: int = 32
    channels: int = 1
    levels: int = 2
    wavelet: str = "haar"
    mode: str = "symmetric"
    widths: tuple[int, ...] = (64, 32)
    num_blocks: int = 2
    num_classes: int | None = None
    objective: str = "flow"
    sample_steps: int = 10
    cond_noise: float = 0.0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        check_int("RefinerConfig.image_size", self.image_size, 2)
        check_int("RefinerConfig.channels", self.channels, 1)
        check_int("RefinerConfig.levels", self.levels, 1)
        check_int("RefinerConfig.num_blocks", self.num_blocks, 1)
        check_int("RefinerConfig.sample_steps", self.sample_steps, 1)
        if not isinstance(self.wavelet, str):
            raise ValueError(f"RefinerConfig.wavelet must be a PyWavelets name such as 'haar', got {self.wavelet!r}")
        if self.mode not in wavelets.SUPPORTED_MODES:
            raise ValueError(f"RefinerConfig.mode={self.mode!r} is unsupported; use one of {wavelets.SUPPORTED_MODES}")
        most = wavelets.max_levels(self.image_size, self.image_size, self.wavelet)  # validates the wavelet
        if self.levels > most:
            raise ValueError(
                f"RefinerConfig.levels={self.levels} is too many for {self.image_size}x{self.image_size} images "
                f"with {self.wavelet!r}: at most {most}; use fewer levels or larger images")
        widths = tuple(self.widths) if isinstance(self.widths, (list, tuple)) else self.widths
        if not isinstance(widths, tuple) or len(widths) != self.levels:
            raise ValueError(
                f"RefinerConfig.widths={self.widths!r} needs one width per level ({self.levels}), coarse level first")
        for w in widths:
            check_int("RefinerConfig.widths[i]", w, 8)
        object.__setattr__(self, "widths", widths)
        if self.num_classes is not None:
            check_int("RefinerConfig.num_classes", self.num_classes, 1)
        if self.objective not in OBJECTIVES:
            raise ValueError(f"RefinerConfig.objective={self.objective!r} is unknown; use one of {OBJECTIVES}")
        if not (isinstance(self.cond_noise, (int, float)) and 0.0 <= self.cond_noise < 1.0):
            raise ValueError(f"RefinerConfig.cond_noise must be a float in [0, 1), got {self.cond_noise!r}")
        dtype = jnp.dtype(self.dtype).name if not isinstance(self.dtype, str) else self.dtype
        if dtype not in _DTYPES:
            raise ValueError(f"RefinerConfig.dtype must be one of {_DTYPES}, got {self.dtype!r}")
        object.__setattr__(self, "dtype", dtype)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RefinerConfig:
        """Builds a config from a mapping (e.g. an ml_collections ConfigDict's `to_dict()`)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown RefinerConfig keys {unknown}; valid keys are {sorted(names)}")
        return cls(**dict(values))


@functools.cache
def band_shapes(config: RefinerConfig) -> tuple[tuple[int, int], ...]:
    """Spatial shape of the approximation band fed to each level, level L first, then the image's."""
    images = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, config.channels), jnp.float32)
    pyr = jax.eval_shape(lambda x: wavelets.decompose(x, config.levels, config.wavelet, config.mode), images)
    return tuple(tuple(b[0].shape[1:3]) for b in pyr.details) + ((config.image_size, config.image_size),)


def _normalize(band: jax.Array, config: RefinerConfig, level: int) -> jax.Array:
    return band / wavelets.band_gain(level, config.wavelet)


def _denormalize(band: jax.Array, config: RefinerConfig, level: int) -> jax.Array:
    return band * wavelets.band_gain(level, config.wavelet)


def time_features(t: jax.Array) -> jax.Array:
    """Sinusoidal features of t in [0, 1], (N,) -> (N, _TIME_FEATURES)."""
    half = _TIME_FEATURES // 2
    freqs = jnp.exp(-math.log(1000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    args = 1000.0 * t[:, None].astype(jnp.float32) * freqs[None]
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class ResBlock(nnx.Module):
    """GroupNorm-SiLU-conv twice, with FiLM (scale, shift) from a conditioning vector when given."""

    def __init__(self, width: int, cond_dim: int, dtype: jnp.dtype, *, rngs: nnx.Rngs):
        groups = math.gcd(8, width)
        self.norm1 = nnx.GroupNorm(width, num_groups=groups, dtype=dtype, rngs=rngs)
        self.conv1 = nnx.Conv(width, width, (3, 3), dtype=dtype, rngs=rngs)
        self.norm2 = nnx.GroupNorm(width, num_groups=groups, dtype=dtype, rngs=rngs)
        self.conv2 = nnx.Conv(width, width, (3, 3), dtype=dtype, kernel_init=nnx.initializers.zeros, rngs=rngs)
        self.film = (nnx.Linear(cond_dim, 2 * width, dtype=dtype, kernel_init=nnx.initializers.zeros, rngs=rngs)
                     if cond_dim else None)

    def __call__(self, x: jax.Array, cond: jax.Array | None) -> jax.Array:
        h = self.norm2(self.conv1(nnx.silu(self.norm1(x))))
        if self.film is not None:
            scale, shift = jnp.split(self.film(cond)[:, None, None, :], 2, axis=-1)
            h = h * (1.0 + scale) + shift
        return x + self.conv2(nnx.silu(h))


class LevelNet(nnx.Module):
    """Conv net of one level: (approximation, [noisy details, t], [label]) -> 3C detail bands."""

    def __init__(self, config: RefinerConfig, width: int, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(config.dtype)
        c = config.channels
        self.flow = config.objective == "flow"
        in_ch = c + (3 * c if self.flow else 0)
        cond_dim = width if (self.flow or config.num_classes) else 0
        self.time_mlp = (nnx.Sequential(nnx.Linear(_TIME_FEATURES, width, dtype=dtype, rngs=rngs), nnx.silu,
                                        nnx.Linear(width, width, dtype=dtype, rngs=rngs)) if self.flow else None)
        self.label_embed = (nnx.Embed(config.num_classes, width, dtype=dtype, rngs=rngs)
                            if config.num_classes else None)
        self.stem = nnx.Conv(in_ch, width, (3, 3), dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([ResBlock(width, cond_dim, dtype, rngs=rngs) for _ in range(config.num_blocks)])
        self.out_norm = nnx.GroupNorm(width, num_groups=math.gcd(8, width), dtype=dtype, rngs=rngs)
        self.head = nnx.Conv(width, 3 * c, (3, 3), dtype=dtype, kernel_init=nnx.initializers.zeros, rngs=rngs)
        self.dtype = dtype

    def __call__(self, approx: jax.Array, x_t: jax.Array | None = None, t: jax.Array | None = None,
                 label: jax.Array | None = None) -> jax.Array:
        """approx: (N, h, w, C) normalized; x_t: (N, h, w, 3C) and t: (N,) for flow. Returns float32."""
        x = jnp.concatenate([approx, x_t], axis=-1) if self.flow else approx
        cond = None
        if self.time_mlp is not None:
            cond = self.time_mlp(time_features(t).astype(self.dtype))
        if self.label_embed is not None:
            emb = self.label_embed(label)
            cond = emb if cond is None else cond + emb
        h = self.stem(x.astype(self.dtype))
        for block in self.blocks:
            h = block(h, cond)
        return self.head(nnx.silu(self.out_norm(h))).astype(jnp.float32)


class Refiner(nnx.Module):
    """One `LevelNet` per wavelet level; `nets[i]` serves level L - i (coarse first)."""

    def __init__(self, config: RefinerConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.nets = nnx.List([LevelNet(config, w, rngs=rngs) for w in config.widths])


def _check_label(config: RefinerConfig, label: jax.Array | None, batch: int) -> jax.Array | None:
    if config.num_classes is None:
        if label is not None:
            raise ValueError("this refiner is unconditional (num_classes=None); pass label=None")
        return None
    if label is None:
        raise ValueError(f"this refiner is class-conditional (num_classes={config.num_classes}); pass label")
    label = jnp.asarray(label)
    if label.shape != (batch,) or not jnp.issubdtype(label.dtype, jnp.integer):
        raise ValueError(f"label must be int with shape ({batch},), got {label.dtype} {label.shape}")
    return label


def _synthesize_level(config: RefinerConfig, approx: jax.Array, details: wavelets.Bands,
                      out_hw: tuple[int, int]) -> jax.Array:
    """One inverse DWT level: the approximation band of the level below (or the image)."""
    pyr = wavelets.Pyramid(approx, (details,), config.wavelet, config.mode, out_hw)
    return wavelets.reconstruct(pyr)


def _sample_level(net: LevelNet, config: RefinerConfig, cond: jax.Array, key: jax.Array,
                  label: jax.Array | None, steps: int) -> jax.Array:
    """Normalized detail bands for one level, (N, h, w, 3C)."""
    if config.objective == "regression":
        return net(cond, label=label)
    n = cond.shape[0]
    dt = 1.0 / steps

    def euler(i: int, x: jax.Array) -> jax.Array:
        t = i * dt
        x1 = net(cond, x, jnp.full((n,), t, jnp.float32), label)
        return x + dt * (x1 - x) / (1.0 - t)

    x0 = jax.random.normal(key, cond.shape[:3] + (3 * config.channels,), jnp.float32)
    return jax.lax.fori_loop(0, steps, euler, x0)


def refine(model: Refiner, coarse: jax.Array, key: jax.Array, label: jax.Array | None = None, *,
           sample_steps: int | None = None) -> wavelets.Pyramid:
    """Predicts every detail band from the level-L coarse band (band units, as `decompose` gives it).

    Deterministic for a fixed key; `refine_fn` is the jitted functional form. `sample_steps` overrides
    the config's Euler steps (1 gives the flow model's conditional-mean prediction).
    `wavelets.reconstruct` of the result gives images of `config.image_size`, with the coarse band kept.
    """
    config = model.config
    steps = config.sample_steps if sample_steps is None else sample_steps
    check_int("sample_steps", steps, 1)
    shapes = band_shapes(config)
    want = (shapes[0][0], shapes[0][1], config.channels)
    if coarse.ndim != 4 or tuple(coarse.shape[1:]) != want:
        raise ValueError(
            f"coarse band has shape {tuple(coarse.shape)}; this refiner expects (N, {want[0]}, {want[1]}, {want[2]}) "
            f"(level-{config.levels} band of {config.image_size}x{config.image_size}x{config.channels} images)")
    label = _check_label(config, label, coarse.shape[0])
    approx = coarse.astype(jnp.float32)
    details = []
    for i, net in enumerate(model.nets):
        level = config.levels - i
        cond = _normalize(approx, config, level)
        pred = _sample_level(net, config, cond, jax.random.fold_in(key, level), label, steps)
        bands = tuple(jnp.split(_denormalize(pred, config, level), 3, axis=-1))
        details.append(bands)
        approx = _synthesize_level(config, approx, bands, shapes[i + 1])
    return wavelets.Pyramid(coarse.astype(jnp.float32), tuple(details), config.wavelet, config.mode,
                            (config.image_size, config.image_size))


@functools.partial(jax.jit, static_argnames=("graphdef", "sample_steps"))
def refine_fn(graphdef: nnx.GraphDef, params: nnx.State, coarse: jax.Array, key: jax.Array,
              label: jax.Array | None = None, *, sample_steps: int | None = None) -> wavelets.Pyramid:
    """Pure, jitted `refine` over a split model (``nnx.split(model, nnx.Param)``)."""
    return refine(nnx.merge(graphdef, params), coarse, key, label, sample_steps=sample_steps)


def as_float_images(images: jax.Array) -> jax.Array:
    """uint8 pixels -> float32 in [-1, 1] (as `dpwave.data.to_float`); float images pass through as float32."""
    if getattr(images, "dtype", None) == np.uint8:
        return jnp.asarray(images.astype(np.float32) / 127.5 - 1.0)
    images = jnp.asarray(images)
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"images must be uint8 or float in [-1, 1], got {images.dtype}; see dpwave.data.to_float")
    return images.astype(jnp.float32)


def refiner_loss(graphdef: nnx.GraphDef, params: nnx.State, batch: Mapping[str, jax.Array],
                 rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean training loss over a batch {"image": (B, H, W, C) uint8 or [-1, 1] float, ["label": (B,)]}.

    Summed over levels; every level is conditioned on the TRUE approximation band (teacher forcing).
    Returns (loss, {"loss_level_<l>": ...}); use `jax.value_and_grad(..., argnums=1, has_aux=True)`.
    """
    model = nnx.merge(graphdef, params)
    config = model.config
    images = as_float_images(batch["image"])
    label = _check_label(config, batch.get("label") if config.num_classes else None, images.shape[0])
    pyr = wavelets.decompose(images, config.levels, config.wavelet, config.mode)
    total, aux = jnp.float32(0.0), {}
    approx = pyr.coarse
    for i, (net, bands) in enumerate(zip(model.nets, pyr.details)):
        level = config.levels - i
        key = jax.random.fold_in(rng, level)
        k_noise, k_z, k_t = jax.random.split(key, 3)
        cond = _normalize(approx, config, level)
        cond = cond + config.cond_noise * jax.random.normal(k_noise, cond.shape, jnp.float32)
        target = _normalize(jnp.concatenate(bands, axis=-1), config, level)
        if config.objective == "flow":
            z = jax.random.normal(k_z, target.shape, jnp.float32)
            t = jax.random.uniform(k_t, (target.shape[0],), jnp.float32)
            tb = t[:, None, None, None]
            err = net(cond, (1.0 - tb) * z + tb * target, t, label) - target
        else:
            err = net(cond, label=label) - target
        loss = jnp.mean(jnp.square(err))
        aux[f"loss_level_{level}"] = loss
        total = total + loss
        approx = _synthesize_level(config, approx, bands, band_shapes(config)[i + 1])
    return total, aux


def make_optimizer(learning_rate: float, steps: int) -> optax.GradientTransformation:
    """AdamW with linear warmup and cosine decay, after global-norm clipping at 1."""
    warmup = max(1, min(200, steps // 10))
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, max(steps, warmup + 1),
                                                  end_value=learning_rate * 0.05)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-4))


def detail_energy_ratio(pred: wavelets.Pyramid, true: wavelets.Pyramid) -> list[float]:
    """Sharpness per level, coarse level first: sum of squared predicted details / true ones (1.0 ideal)."""
    if pred.levels != true.levels:
        raise ValueError(f"pyramids have {pred.levels} and {true.levels} levels; compare equal depths")
    energy = lambda bands: float(sum(jnp.sum(jnp.square(b)) for b in bands))
    return [energy(p) / max(energy(t), 1e-12) for p, t in zip(pred.details, true.details)]
