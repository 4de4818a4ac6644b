"""Spectral tokenizer: a VQ autoencoder over patches of wavelet coefficients, coarse scale first.

After the Spectral Image Tokenizer (Esteves et al. 2024). An image is decomposed into ``levels``
wavelet levels; its scales are ``[coarse band, level-L details, ..., level-1 details]`` (the three
detail bands of a level stacked on channels). Each scale has its own patch size, token grid,
encoder, quantizer and decoder. The encoder and decoder of a detail scale also see, as context,
the approximation band of that level (same grid): the encoder the true one, the decoder the one
reconstructed from the *decoded* coarser scales, so a token prefix decodes without finer tokens.

Token ids: scale ``s`` has its own codebook and its codes are offset by ``s * codebook_size``,
so one vocabulary of ``vocab_size = num_scales * codebook_size`` ids covers all scales and the
coarse tokens are exactly ``[0, codebook_size)``. Tokens are concatenated in scale order (each
scale's grid in row-major order); ``scale_boundaries`` are the cumulative end indices.

Functional use: ``graphdef, params, stats = nnx.split(model, nnx.Param, ...)``; ``stats`` holds
the per-scale input scales (set once by ``calibrate``) and the codebook bookkeeping (EMA codebooks,
code usage) that ``train_step`` updates outside the gradient.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dpwave import wavelets
from dpwave.validation import is_int
from dpwave.models.vq import (
    CODEBOOK_UPDATES,
    CodebookUsage,
    Quantized,
    VectorQuantizer,
    codebook_usage,
)

ENCODE_SCALES = ("coarse", "all")


@functools.cache
def _band_shapes(
    image_size: tuple[int, int], channels: int, levels: int, wavelet: str, mode: str
) -> tuple[tuple[int, int, int], ...]:
    """(h, w, channels) of every scale, coarse first (validates the wavelet setup)."""
    spec = jax.ShapeDtypeStruct((1, *image_size, channels), jnp.float32)
    scales = jax.eval_shape(lambda x: wavelets.decompose(x, levels, wavelet, mode).scales(), spec)
    return tuple(tuple(int(d) for d in s.shape[1:]) for s in scales)


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
    """Architecture and codebook learning of ``SpectralTokenizer``; hashable (static under jit).

    Attributes:
      image_size: (H, W) of the images.
      channels: image channels.
      levels: wavelet levels L; there are L + 1 scales.
      wavelet, mode: any PyWavelets discrete wavelet and a ``wavelets.SUPPORTED_MODES`` mode.
      patch_sizes: one square patch size per scale, coarse first; each must divide its band.
      codebook_size: codes per scale.
      code_dim: dimension of the factorized, l2-normalized codes.
      width, depth: channels and residual blocks of every per-scale encoder and decoder.
      commitment_weight: weight of the commitment loss.
      codebook_update: ``"ema"`` (moving average of assigned latents) or ``"gradient"``
        (codebook loss, straight-through estimator either way).
      ema_decay: decay of the EMA codebook and of the code-usage statistics.
      dead_code_threshold: a code is restarted at a random latent of the batch when its EMA share
        of assignments falls below this fraction of the uniform share; 0 disables restarts.
    """

    image_size: tuple[int, int] = (32, 32)
    channels: int = 1
    levels: int = 2
    wavelet: str = "haar"
    mode: str = "symmetric"
    patch_sizes: tuple[int, ...] = (2, 2, 2)
    codebook_size: int = 512
    code_dim: int = 8
    width: int = 64
    depth: int = 2
    commitment_weight: float = 0.25
    codebook_update: str = "ema"
    ema_decay: float = 0.95
    dead_code_threshold: float = 0.03

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_sizes"):
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)) or not all(is_int(v) and v >= 1 for v in value):
                raise ValueError(f"TokenizerConfig.{name} must be a sequence of positive ints, got {value!r}")
            object.__setattr__(self, name, tuple(int(v) for v in value))
        if len(self.image_size) != 2:
            raise ValueError(f"TokenizerConfig.image_size must be (H, W), got {self.image_size!r}")
        for name, minimum in (
            ("channels", 1),
            ("levels", 1),
            ("codebook_size", 2),
            ("code_dim", 1),
            ("width", 1),
            ("depth", 0),
        ):
            value = getattr(self, name)
            if not is_int(value) or value < minimum:
                raise ValueError(f"TokenizerConfig.{name} must be an int >= {minimum}, got {value!r}")
        if self.codebook_update not in CODEBOOK_UPDATES:
            raise ValueError(f"TokenizerConfig.codebook_update={self.codebook_update!r}: use one of {CODEBOOK_UPDATES}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"TokenizerConfig.ema_decay must be in (0, 1), got {self.ema_decay!r}")
        if not 0.0 <= self.dead_code_threshold < 1.0:
            raise ValueError(
                f"TokenizerConfig.dead_code_threshold must be in [0, 1) (0 disables restarts), "
                f"got {self.dead_code_threshold!r}"
            )
        if not self.commitment_weight >= 0.0:
            raise ValueError(f"TokenizerConfig.commitment_weight must be >= 0, got {self.commitment_weight!r}")
        if len(self.patch_sizes) != self.num_scales:
            raise ValueError(
                f"TokenizerConfig.patch_sizes={self.patch_sizes}: need one patch size per scale "
                f"({self.num_scales} = coarse + {self.levels} levels), coarse first"
            )
        for s, ((h, w, _), p) in enumerate(zip(self.band_shapes, self.patch_sizes)):
            if h % p or w % p:
                divisors = [d for d in range(1, min(h, w) + 1) if h % d == 0 and w % d == 0]
                raise ValueError(
                    f"TokenizerConfig.patch_sizes[{s}]={p} does not divide scale {s}'s {h}x{w} "
                    f"band; pick one of {divisors}"
                )

    @property
    def num_scales(self) -> int:
        return self.levels + 1

    @property
    def band_shapes(self) -> tuple[tuple[int, int, int], ...]:
        """(h, w, channels) of each scale, coarse first (details have 3 * channels)."""
        try:
            return _band_shapes(self.image_size, self.channels, self.levels, self.wavelet, self.mode)
        except TypeError as e:
            raise ValueError(f"TokenizerConfig.wavelet={self.wavelet!r}: {e}") from None

    @property
    def scale_levels(self) -> tuple[int, ...]:
        """Wavelet level of each scale: (L, L, L - 1, ..., 1)."""
        return (self.levels,) + tuple(range(self.levels, 0, -1))

    @property
    def grids(self) -> tuple[tuple[int, int], ...]:
        """Token grid (rows, columns) of each scale."""
        return tuple((h // p, w // p) for (h, w, _), p in zip(self.band_shapes, self.patch_sizes))

    @property
    def tokens_per_scale(self) -> tuple[int, ...]:
        return tuple(r * c for r, c in self.grids)

    @property
    def scale_boundaries(self) -> tuple[int, ...]:
        """Cumulative end index of each scale's tokens, e.g. (16, 32, 96)."""
        return tuple(int(b) for b in np.cumsum(self.tokens_per_scale))

    @property
    def vocab_size(self) -> int:
        return self.num_scales * self.codebook_size


class _ResBlock(nnx.Module):
    """ConvNeXt-style block on a token grid: x + MLP(LayerNorm(depthwise 3x3 conv(x)))."""

    def __init__(self, width: int, *, rngs: nnx.Rngs):
        self.mix = nnx.Conv(width, width, (3, 3), feature_group_count=width, rngs=rngs)
        self.norm = nnx.LayerNorm(width, rngs=rngs)
        self.up = nnx.Linear(width, 2 * width, rngs=rngs)
        self.down = nnx.Linear(2 * width, width, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.down(jax.nn.gelu(self.up(self.norm(self.mix(x)))))


class _GridNet(nnx.Module):
    """Per-token features (N, rows, cols, in_dim) -> (N, rows, cols, out_dim) with 3x3 token mixing."""

    def __init__(self, in_dim: int, out_dim: int, grid: tuple[int, int], width: int, depth: int, *, rngs: nnx.Rngs):
        self.embed = nnx.Linear(in_dim, width, rngs=rngs)
        self.position = nnx.Param(jax.random.normal(rngs.params(), (*grid, width), jnp.float32) * 0.02)
        self.blocks = nnx.List([_ResBlock(width, rngs=rngs) for _ in range(depth)])
        self.norm = nnx.LayerNorm(width, rngs=rngs)
        self.head = nnx.Linear(width, out_dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.embed(x) + self.position.value
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


class _ScaleCoder(nnx.Module):
    """Encoder, quantizer and decoder of one scale; detail scales take an approximation band as context."""

    def __init__(self, config: TokenizerConfig, scale: int, *, rngs: nnx.Rngs):
        h, w, ch = config.band_shapes[scale]
        p = config.patch_sizes[scale]
        self.patch = p
        self.band_hw = (h, w)
        context = p * p * config.channels if scale > 0 else 0
        grid = config.grids[scale]
        self.encoder = _GridNet(p * p * ch + context, config.code_dim, grid, config.width, config.depth, rngs=rngs)
        self.quantizer = VectorQuantizer(
            config.codebook_size, config.code_dim, update=config.codebook_update, rngs=rngs
        )
        self.decoder = _GridNet(config.code_dim + context, p * p * ch, grid, config.width, config.depth, rngs=rngs)

    def _grid(self, band: jax.Array) -> jax.Array:
        n = band.shape[0]
        h, w = self.band_hw
        return wavelets.patchify(band, self.patch).reshape(n, h // self.patch, w // self.patch, -1)

    def _inputs(self, x: jax.Array, context: jax.Array | None) -> jax.Array:
        return x if context is None else jnp.concatenate([x, self._grid(context)], axis=-1)

    def encode(self, band: jax.Array, context: jax.Array | None) -> Quantized:
        """Normalized band (and context band) -> quantized latents on the token grid."""
        return self.quantizer(self.encoder(self._inputs(self._grid(band), context)))

    def decode(self, codes: jax.Array, context: jax.Array | None) -> jax.Array:
        """Code vectors (N, rows, cols, code_dim) -> normalized band (N, h, w, ch)."""
        out = self.decoder(self._inputs(codes, context))
        n, rows, cols, _ = out.shape
        return wavelets.unpatchify(out.reshape(n, rows * cols, -1), self.patch, *self.band_hw)


class TokenizerOutput(NamedTuple):
    """What a training forward pass produces (bands in wavelet units, coarse first)."""

    targets: list[jax.Array]
    reconstructions: list[jax.Array]
    quantized: list[Quantized]


class BandScale(nnx.Variable):
    """Per-scale RMS of the wavelet coefficients (0 until calibrated); not a ``Param``."""


class SpectralTokenizer(nnx.Module):
    """Scale-ordered VQ tokenizer of wavelet coefficients (see the module docstring).

    Each scale's coefficients are divided by ``band_scales()[s]`` on the way in and multiplied by it
    on the way out: the band's RMS once calibrated, its wavelet gain before. Detail bands are an order
    of magnitude smaller than the coarse band and, unscaled, barely move their encoders (measured on
    mnist5k: detail codes carried no information). ``train_step`` calibrates an uncalibrated model on its
    first batch (`calibrate` does it on any images).
    """

    def __init__(self, config: TokenizerConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.coders = nnx.List([_ScaleCoder(config, s, rngs=rngs) for s in range(config.num_scales)])
        self.gains = tuple(wavelets.band_gain(level, config.wavelet) for level in config.scale_levels)
        self.band_scale = BandScale(jnp.zeros((config.num_scales,), jnp.float32))

    def band_scales(self) -> jax.Array:
        """The per-scale divisors in use: calibrated RMS, or the wavelet gain where uncalibrated."""
        value = self.band_scale.value
        return jnp.where(value > 0, value, jnp.asarray(self.gains, jnp.float32))

    def calibrate(self, images: jax.Array, *, overwrite: bool = True) -> None:
        """Sets ``band_scale`` to each scale's RMS coefficient on ``images`` (with ``overwrite=False``
        only where still uncalibrated; jit-safe)."""
        self._check_images(images)
        rms = jnp.maximum(jnp.stack([jnp.sqrt(jnp.mean(jnp.square(b))) for b in self._scales(images)]), 1e-6)
        old = self.band_scale.value
        self.band_scale.value = rms if overwrite else jnp.where(old > 0, old, rms)

    @property
    def tokens_per_scale(self) -> list[int]:
        return list(self.config.tokens_per_scale)

    @property
    def scale_boundaries(self) -> list[int]:
        return list(self.config.scale_boundaries)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    # -- wavelet plumbing ---------------------------------------------------------------------------
    def _check_images(self, images: jax.Array) -> None:
        want = (*self.config.image_size, self.config.channels)
        if images.ndim != 4 or tuple(images.shape[1:]) != want:
            raise ValueError(
                f"images must be NHWC with (H, W, C) = {want} (this tokenizer's config), got "
                f"shape {tuple(images.shape)}"
            )
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise ValueError(
                f"images must be float in [-1, 1], got {images.dtype}; convert uint8 with dpwave.data.to_float"
            )

    def _scales(self, images: jax.Array) -> list[jax.Array]:
        c = self.config
        return wavelets.decompose(images.astype(jnp.float32), c.levels, c.wavelet, c.mode).scales()

    def _pyramid(self, scales: Sequence[jax.Array], image_hw: tuple[int, int]) -> wavelets.Pyramid:
        details = tuple(tuple(jnp.split(s, 3, axis=-1)) for s in scales[1:])
        return wavelets.Pyramid(scales[0], details, self.config.wavelet, self.config.mode, image_hw)

    def _context(self, prefix: Sequence[jax.Array], scale: int) -> jax.Array | None:
        """Normalized approximation band at scale ``scale``'s level, from the coarser scales ``prefix``."""
        if scale == 0:
            return None
        level = self.config.scale_levels[scale]
        if scale == 1:
            approx = prefix[0]
        else:
            h, w, _ = self.config.band_shapes[scale]
            approx = wavelets.reconstruct(self._pyramid(prefix[:scale], (h, w)))
        return approx / wavelets.band_gain(level, self.config.wavelet)

    def _decode_scale(self, scale: int, codes: jax.Array, prefix: Sequence[jax.Array]) -> jax.Array:
        context = self._context([jax.lax.stop_gradient(b) for b in prefix], scale)
        return self.coders[scale].decode(codes, context) * self.band_scales()[scale]

    # -- training forward ---------------------------------------------------------------------------
    def __call__(self, images: jax.Array) -> TokenizerOutput:
        """Encodes, quantizes and decodes every scale (decoders see decoded coarser scales)."""
        self._check_images(images)
        targets = self._scales(images)
        quantized, recons = [], []
        for s, coder in enumerate(self.coders):
            q = coder.encode(targets[s] / self.band_scales()[s], self._context(targets, s))
            quantized.append(q)
            recons.append(self._decode_scale(s, q.quantized, recons))
        return TokenizerOutput(targets, recons, quantized)

    # -- tokens -------------------------------------------------------------------------------------
    def encode(self, images: jax.Array, scales: str = "all") -> jax.Array:
        """Float images in [-1, 1], NHWC -> int32 tokens (N, T), scale-ordered with vocabulary offsets.

        ``scales="coarse"`` returns only the coarse band's tokens (T = tokens_per_scale[0]).
        """
        if scales not in ENCODE_SCALES:
            raise ValueError(f"scales={scales!r}: use one of {ENCODE_SCALES}")
        self._check_images(images)
        bands = self._scales(images)
        count = 1 if scales == "coarse" else self.config.num_scales
        tokens = []
        for s in range(count):
            q = self.coders[s].encode(bands[s] / self.band_scales()[s], self._context(bands, s))
            tokens.append(q.codes.reshape(q.codes.shape[0], -1) + s * self.config.codebook_size)
        return jnp.concatenate(tokens, axis=1).astype(jnp.int32)

    def _split_tokens(self, tokens: jax.Array) -> list[jax.Array]:
        """(N, T) tokens with T a scale boundary -> per present scale, local codes on its token grid."""
        bounds = self.scale_boundaries
        if tokens.ndim != 2 or tokens.shape[1] not in bounds:
            raise ValueError(
                f"tokens must be (N, T) with T a scale boundary {bounds} (a prefix of whole "
                f"scales), got shape {tuple(tokens.shape)}"
            )
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be integers, got {tokens.dtype}")
        starts = [0] + bounds[:-1]
        count = bounds.index(tokens.shape[1]) + 1
        return [
            (tokens[:, starts[s] : bounds[s]] - s * self.config.codebook_size).reshape(
                tokens.shape[0], *self.config.grids[s]
            )
            for s in range(count)
        ]

    def decode_scales(self, tokens: jax.Array) -> list[jax.Array]:
        """Tokens of the first k scales -> their decoded bands (wavelet units), coarse first."""
        bands: list[jax.Array] = []
        for s, codes in enumerate(self._split_tokens(tokens)):
            bands.append(self._decode_scale(s, self.coders[s].quantizer.lookup(codes), bands))
        return bands

    def decode_coarse(self, tokens: jax.Array) -> jax.Array:
        """The decoded coarse band (N, h, w, C) in wavelet units, from the first tokens_per_scale[0]
        tokens (what the refiner consumes)."""
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be (N, T), got shape {tuple(tokens.shape)}")
        return self.decode_scales(tokens[:, : self.tokens_per_scale[0]])[0]

    def decode(self, tokens: jax.Array) -> jax.Array:
        """Tokens of the first k scales -> images (N, H, W, C); missing detail scales are zero, so a
        coarse-only prefix gives the coarse image at full size. Not clipped to [-1, 1]; ids outside a
        scale's range are clipped into it (jit cannot raise on values)."""
        bands = self.decode_scales(tokens)
        shapes = self.config.band_shapes
        bands += [
            jnp.zeros((tokens.shape[0], *shapes[s]), jnp.float32) for s in range(len(bands), self.config.num_scales)
        ]
        return wavelets.reconstruct(self._pyramid(bands, self.config.image_size))

    def codebook_usage(self, tokens: jax.Array) -> list[CodebookUsage]:
        """Per present scale: share of its codebook used by ``tokens`` and the codes' perplexity."""
        return [codebook_usage(codes, self.config.codebook_size) for codes in self._split_tokens(tokens)]

    # -- codebook bookkeeping -----------------------------------------------------------------------
    def update_codebooks(self, quantized: Sequence[Quantized], key: jax.Array) -> jax.Array:
        """EMA codebook / usage update and dead-code restarts for every scale; returns restarts."""
        restarts = [
            coder.quantizer.update_codebook(
                q.latents,
                q.codes,
                jax.random.fold_in(key, s),
                decay=self.config.ema_decay,
                dead_threshold=self.config.dead_code_threshold,
            )
            for s, (coder, q) in enumerate(zip(self.coders, quantized))
        ]
        return jnp.sum(jnp.stack(restarts))


def psnr(mse: jax.Array, data_range: float = 2.0) -> jax.Array:
    """Peak signal-to-noise ratio (dB) of a mean squared error for images spanning ``data_range``."""
    return 10.0 * jnp.log10(data_range**2 / jnp.maximum(mse, 1e-12))


# -- training ---------------------------------------------------------------------------------------
class LossAux(NamedTuple):
    """Auxiliary output of ``tokenizer_loss``: scalar metrics and each scale's quantizer output."""

    metrics: dict[str, jax.Array]
    quantized: list[Quantized]


def tokenizer_loss(model: SpectralTokenizer, images: jax.Array) -> tuple[jax.Array, LossAux]:
    """Relative reconstruction error of every scale + VQ losses, on float images in [-1, 1].

    Each scale's term is its mean squared error divided by ``band_scales()[s]**2`` (after calibration,
    the share of the band's energy left unexplained), so the small detail bands weigh as much
    against their commitment loss as the coarse band does. Metrics report the image-space error:
    ``mse`` sums squared errors over all coefficients per pixel (the image MSE for orthonormal
    wavelets such as Haar, dbN, symN) and ``psnr`` is computed from it.
    """
    out = model(images)
    pixels = math.prod(images.shape)
    sse = [jnp.sum((r - t) ** 2) for r, t in zip(out.reconstructions, out.targets)]
    scales = model.band_scales()
    relative = [e / (t.size * scales[s] ** 2) for s, (e, t) in enumerate(zip(sse, out.targets))]
    codebook = sum(q.codebook_loss for q in out.quantized)
    commitment = sum(q.commitment_loss for q in out.quantized)
    loss = sum(relative) + codebook + model.config.commitment_weight * commitment
    mse = sum(sse) / pixels
    metrics = {
        "loss": loss,
        "mse": mse,
        "psnr": psnr(mse),
        "commitment": commitment,
        **{f"relative_error_scale{s}": r for s, r in enumerate(relative)},
    }
    return loss, LossAux(metrics, out.quantized)


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["params", "stats", "opt_state", "step"], meta_fields=[]
)
@dataclasses.dataclass(frozen=True)
class TokenizerTrainState:
    """Everything a tokenizer training step reads and writes (a pytree).

    Attributes:
      params: ``nnx.Param`` state of the model.
      stats: the rest of the model state (EMA codebooks, code usage).
      opt_state: optimizer state of ``params``.
      step: int32 step counter.
    """

    params: nnx.State
    stats: nnx.State
    opt_state: optax.OptState
    step: jax.Array


def make_optimizer(learning_rate: float, steps: int) -> optax.GradientTransformation:
    """Adam with a 5% linear warmup and cosine decay to 10% of ``learning_rate`` over ``steps``."""
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate!r}")
    if not is_int(steps) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, max(1, steps // 20), steps, end_value=0.1 * learning_rate
    )
    return optax.adam(schedule)


def init_train_state(
    model: SpectralTokenizer, optimizer: optax.GradientTransformation
) -> tuple[nnx.GraphDef, TokenizerTrainState]:
    """Splits ``model`` into its graphdef and a fresh training state."""
    graphdef, params, stats = nnx.split(model, nnx.Param, ...)
    return graphdef, TokenizerTrainState(params, stats, optimizer.init(params), jnp.zeros((), jnp.int32))


def train_step(
    graphdef: nnx.GraphDef,
    state: TokenizerTrainState,
    images: jax.Array,
    key: jax.Array,
    optimizer: optax.GradientTransformation,
) -> tuple[TokenizerTrainState, dict[str, jax.Array]]:
    """One pure training step: Adam on the loss, then the codebook EMA / dead-code restarts.

    Jit it with ``graphdef`` and ``optimizer`` static (``functools.partial`` the optimizer) and
    ``state`` donated. ``key`` drives the restarts only; ``images`` are float in [-1, 1]. An
    uncalibrated model is calibrated on this batch first (see ``SpectralTokenizer.calibrate``).
    """
    model = nnx.merge(graphdef, state.params, state.stats)
    model.calibrate(images, overwrite=False)
    _, _, stats = nnx.split(model, nnx.Param, ...)

    def loss_fn(params: nnx.State) -> tuple[jax.Array, LossAux]:
        return tokenizer_loss(nnx.merge(graphdef, params, stats), images)

    (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    model = nnx.merge(graphdef, optax.apply_updates(state.params, updates), stats)
    restarts = model.update_codebooks(aux.quantized, key)
    _, params, stats = nnx.split(model, nnx.Param, ...)
    metrics = {**aux.metrics, "restarted_codes": restarts}
    return TokenizerTrainState(params, stats, opt_state, state.step + 1), metrics


# -- evaluation -------------------------------------------------------------------------------------
def _batched(fn: Callable[[jax.Array], Any], images: jax.Array, batch_size: int) -> list[Any]:
    return [fn(images[i : i + batch_size]) for i in range(0, images.shape[0], batch_size)]


def encode_decode(
    model: SpectralTokenizer, images: jax.Array, *, batch_size: int = 500
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Jitted round trip over ``images`` in batches: (all-scale tokens, all-scale decode, coarse-only
    decode)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state: nnx.State, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        m = nnx.merge(graphdef, state)
        tokens = m.encode(x)
        return tokens, m.decode(tokens), m.decode(tokens[:, : m.tokens_per_scale[0]])

    parts = _batched(lambda x: run(state, x), jnp.asarray(images, jnp.float32), batch_size)
    return tuple(jnp.concatenate(p) for p in zip(*parts))


def reconstruction_psnr(model: SpectralTokenizer, images: jax.Array, *, batch_size: int = 500) -> dict[str, Any]:
    """Round-trip quality on float images in [-1, 1] (decodes clipped to [-1, 1]).

    Returns ``all`` (PSNR of the all-scale decode vs the images), ``coarse`` (PSNR of the
    coarse-only decode vs the images' true coarse-only reconstruction: the coarse band's fidelity),
    ``coarse_vs_images`` (coarse-only decode vs the images) and per-scale ``usage``.
    """
    c = model.config
    images = jnp.asarray(images, jnp.float32)
    tokens, full, coarse = encode_decode(model, images, batch_size=batch_size)
    truth = wavelets.reconstruct(wavelets.coarse_only(wavelets.decompose(images, c.levels, c.wavelet, c.mode)))
    mse = lambda a, b: jnp.mean((jnp.clip(a, -1.0, 1.0) - b) ** 2)
    return {
        "all": float(psnr(mse(full, images))),
        "coarse": float(psnr(mse(coarse, jnp.clip(truth, -1, 1)))),
        "coarse_vs_images": float(psnr(mse(coarse, images))),
        "usage": [u._asdict() for u in model.codebook_usage(tokens)],
    }
