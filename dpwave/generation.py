"""The generation pipeline: AR tokens -> tokenizer -> images, for the three methods of the paper.

* ``"dpwave"``: the AR model samples the COARSE tokens; the tokenizer decodes the coarse band; the
  public refiner predicts the detail bands (levels L..1); ``wavelets.reconstruct`` gives the images.
  The refiner only adds detail bands: the coarse band of the images is the decoded DP coarse band,
  so refining is post-processing of the DP output.
* ``"full_dp"`` (baseline): the AR model samples every scale's tokens; the tokenizer decodes them all.
* ``"bicubic"`` (ablation): coarse tokens -> coarse band -> bicubic upsampling, no refiner.

A `Generator` holds the models as (graphdef, state) pairs and the sampling settings; `generate` runs
one batch as one jitted function, deterministic from its key (the AR model draws with
``fold_in(key, 0)``, the refiner with ``fold_in(key, 1)``). Images are float in [-1, 1], NHWC (the
tokenizer's and the refiner's convention).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpwave import wavelets
from dpwave.data import to_uint8
from dpwave.models import transformer as transformer_lib
from dpwave.models.refiner import Refiner, refine
from dpwave.models.text import TEXT_PAD
from dpwave.models.tokenizer import SpectralTokenizer

METHODS = ("dpwave", "full_dp", "bicubic")
IMAGE_KEYS = ("images", "coarse_images", "unrefined")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["state"],
                   meta_fields=["graphdef", "config"])
@dataclasses.dataclass(frozen=True)
class Part:
    """One model as a pytree: its state is data, its graphdef and (hashable) config are static."""

    graphdef: nnx.GraphDef
    state: nnx.State
    config: Any

    @classmethod
    def of(cls, model: nnx.Module) -> Part:
        graphdef, state = nnx.split(model)
        return cls(graphdef, state, model.config)

    def module(self) -> Any:
        """The NNX module again (inside a jitted function: over traced state)."""
        return nnx.merge(self.graphdef, self.state)


def _setting_error(name: str, value: Any, need: str) -> ValueError:
    return ValueError(f"Generator.{name}={value!r}: {need}")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["tokenizer", "transformer", "refiner"],
                   meta_fields=["method", "temperature", "top_k", "top_p", "guidance_scale"])
@dataclasses.dataclass(frozen=True)
class Generator:
    """The model pieces of one method plus its sampling settings; a pytree (settings are static).

    Build it with `make_generator`. ``top_k`` None (or 0 in configs) and ``top_p`` None (or 1.0)
    disable those filters; ``guidance_scale`` s is classifier-free guidance ``cond + s (cond - uncond)``.
    """

    method: str
    tokenizer: Part
    transformer: Part
    refiner: Part | None
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    guidance_scale: float = 0.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise _setting_error("method", self.method, f"use one of {METHODS}")
        try:
            top_k, top_p = transformer_lib.check_sampling(self.temperature, self.top_k, self.top_p,
                                                          self.transformer.config.vocab_size)
        except ValueError as e:
            raise ValueError(f"Generator.{e}") from None
        object.__setattr__(self, "top_k", top_k)
        object.__setattr__(self, "top_p", top_p)
        if not (isinstance(self.guidance_scale, (int, float)) and math.isfinite(self.guidance_scale)):
            raise _setting_error("guidance_scale", self.guidance_scale, "must be a finite number")

    @property
    def num_tokens(self) -> int:
        """Tokens the AR model samples per image: the coarse scale's, or every scale's for full_dp."""
        tok = self.tokenizer.config
        return tok.scale_boundaries[-1] if self.method == "full_dp" else tok.tokens_per_scale[0]

    @property
    def conditioning(self) -> str:
        """``"class"``, ``"text"`` or ``"none"`` (the AR model's)."""
        return self.transformer.config.conditioning


def _check_models(method: str, tok: Any, ar: Any, ref: Any | None) -> None:
    """Raises ValueError unless the three configs fit together for `method`."""
    if method == "full_dp":
        vocab, seq = tok.vocab_size, tok.scale_boundaries[-1]
        if ar.scale_boundaries not in (None, tok.scale_boundaries):
            raise ValueError(f"transformer scale_boundaries={ar.scale_boundaries} differ from the tokenizer's "
                             f"{tok.scale_boundaries}; build the full_dp transformer from this tokenizer")
    else:
        vocab, seq = tok.codebook_size, tok.tokens_per_scale[0]
    if (ar.vocab_size, ar.seq_len) != (vocab, seq):
        raise ValueError(f"method {method!r} needs a transformer with vocab_size={vocab}, seq_len={seq} for this "
                         f"tokenizer, got vocab_size={ar.vocab_size}, seq_len={ar.seq_len}; build it with "
                         "dpwave.train.settings.read (Settings.transformer)")
    if method != "dpwave":
        if ref is not None:
            raise ValueError(f"method {method!r} uses no refiner; pass refiner=None (or method='dpwave')")
        return
    if ref is None:
        raise ValueError("method 'dpwave' needs a refiner; pass refiner=, or use method='bicubic'")
    mine = ((ref.image_size, ref.image_size), ref.channels, ref.levels, ref.wavelet, ref.mode)
    theirs = (tok.image_size, tok.channels, tok.levels, tok.wavelet, tok.mode)
    if mine != theirs:
        raise ValueError(f"refiner (image size, channels, levels, wavelet, mode) = {mine} differ from the "
                         f"tokenizer's {theirs}; train them on the same wavelet setup")
    if ref.num_classes is not None and (ar.conditioning != "class" or ar.num_classes != ref.num_classes):
        raise ValueError(f"the refiner is conditioned on {ref.num_classes} classes but the transformer's "
                         f"condition is {ar.conditioning!r} (num_classes={ar.num_classes}); use an "
                         "unconditional refiner or matching labels")


def make_generator(method: str, tokenizer: SpectralTokenizer, transformer: transformer_lib.ARTransformer,
                   refiner: Refiner | None = None, *, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None, guidance_scale: float = 0.0) -> Generator:
    """A `Generator` from NNX modules (split here), after checking that they fit together."""
    _check_models(method, tokenizer.config, transformer.config, None if refiner is None else refiner.config)
    if guidance_scale and transformer.config.conditioning == "none":
        raise ValueError(f"guidance_scale={guidance_scale} needs a conditional transformer; use 0")
    generator = Generator(method, Part.of(tokenizer), Part.of(transformer),
                          None if refiner is None else Part.of(refiner), temperature=temperature, top_k=top_k,
                          top_p=top_p, guidance_scale=guidance_scale)
    return generator


def refine_coarse(refiner: Refiner, coarse: jax.Array, key: jax.Array,
                  label: jax.Array | None = None) -> wavelets.Pyramid:
    """Detail bands for a coarse band of [-1, 1] images (band units); the pyramid keeps ``coarse``
    itself, so its reconstruction has exactly this coarse band (refining is post-processing)."""
    return refine(refiner, coarse.astype(jnp.float32), key, label)


def _display(band: jax.Array, tok: Any, method: str) -> jax.Array:
    return wavelets.upsample_coarse(band, tok.levels, tok.image_size, tok.wavelet, method=method)


def _generate(generator: Generator, cond: jax.Array | None, key: jax.Array,
              num_samples: int | None) -> dict[str, jax.Array]:
    g = generator
    tokenizer = g.tokenizer.module()
    tok = g.tokenizer.config
    tokens = transformer_lib.sample((g.transformer.graphdef, g.transformer.state), cond,
                                    jax.random.fold_in(key, 0), num_tokens=g.num_tokens,
                                    temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
                                    guidance_scale=g.guidance_scale, batch_size=num_samples)
    coarse = tokenizer.decode_coarse(tokens)
    out = {"tokens": tokens, "coarse": coarse, "coarse_images": _display(coarse, tok, "nearest")}
    if g.method == "full_dp":
        out["images"] = tokenizer.decode(tokens)
    elif g.method == "bicubic":
        out["images"] = _display(coarse, tok, "bicubic")
    else:
        refiner = g.refiner.module()
        label = cond if g.refiner.config.num_classes is not None else None
        out["images"] = wavelets.reconstruct(refine_coarse(refiner, coarse, jax.random.fold_in(key, 1), label))
        out["unrefined"] = _display(coarse, tok, "bicubic")
    for name in IMAGE_KEYS:
        if name in out:
            out[name] = jnp.clip(out[name], -1.0, 1.0)
    return out


_generate_jit = jax.jit(_generate, static_argnames="num_samples")


def _check_cond(generator: Generator, cond: Any, num_samples: int | None) -> tuple[Any, int | None]:
    """Validates `cond` against the AR model's conditioning; returns (cond, static batch size or None)."""
    kind, cfg = generator.conditioning, generator.transformer.config
    if kind == "none":
        if cond is not None:
            raise ValueError("this transformer is unconditional: pass cond=None and num_samples=N")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"an unconditional generator needs num_samples >= 1, got {num_samples!r}")
        return None, num_samples
    if cond is None:
        raise ValueError(f"this transformer is {kind}-conditioned: pass cond (labels (N,) or caption bytes)")
    if num_samples is not None:
        raise ValueError(f"num_samples={num_samples!r} is only for unconditional generators; the batch is "
                         "len(cond)")
    if isinstance(cond, jax.core.Tracer):
        return cond, None
    cond = np.asarray(cond)
    if kind == "class":
        shape, low, high, what = (None,), 0, cfg.num_classes - 1, "labels"
    else:
        shape, low, high, what = (None, cfg.max_text_len), 0, TEXT_PAD, "caption bytes (encode_captions)"
    if cond.ndim != len(shape) or cond.shape[1:] != shape[1:] or cond.shape[0] < 1 \
            or not np.issubdtype(cond.dtype, np.integer):
        want = "(N,)" if kind == "class" else f"(N, {cfg.max_text_len})"
        raise ValueError(f"cond must be int {what} of shape {want} with N >= 1, got {cond.dtype} {cond.shape}")
    if cond.min() < low or cond.max() > high:
        raise ValueError(f"cond {what} span [{cond.min()}, {cond.max()}]; they must lie in [{low}, {high}]")
    return jnp.asarray(cond, jnp.int32), None


def generate(generator: Generator, cond: Any, key: jax.Array, *,
             num_samples: int | None = None) -> dict[str, jax.Array]:
    """One jitted batch: ``cond`` labels (N,) or caption bytes (N, L) (None + ``num_samples`` if the
    model is unconditional).

    Returns float32 NHWC images in [-1, 1]: ``images``, ``coarse_images`` (the coarse band in pixel
    units, nearest-upsampled), and for dpwave ``unrefined`` (bicubic of the coarse band); plus
    ``tokens`` (int32, the AR model's output) and ``coarse`` (the decoded coarse band, band units).
    """
    cond, num_samples = _check_cond(generator, cond, num_samples)
    return _generate_jit(generator, cond, key, num_samples)


def _pad(x: jax.Array, size: int) -> jax.Array:
    return jnp.concatenate([x, jnp.repeat(x[-1:], size - len(x), axis=0)]) if len(x) < size else x


def generate_many(generator: Generator, conds: Any, key: jax.Array, batch_size: int, *,
                  num_samples: int | None = None) -> dict[str, np.ndarray]:
    """`generate` over all of ``conds`` (or ``num_samples`` unconditional samples) in batches of ``batch_size`` as
    uint8 NHWC images (`generate_batches`)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    conds, static_num = _check_cond(generator, conds, num_samples)

    def fn(conds_b: jax.Array | None, key_b: jax.Array) -> dict[str, jax.Array]:
        return _generate_jit(generator, conds_b, key_b, batch_size if conds_b is None else None)

    return generate_batches(fn, conds, key, batch_size, num_samples=static_num)


def generate_batches(fn: Any, conds: Any, key: jax.Array, batch_size: int, *,
                     num_samples: int | None = None) -> dict[str, np.ndarray]:
    """uint8 images of `fn(conds_batch, key_b) -> {name: float [-1, 1] images}` over `conds` (labels or captions;
    None: `num_samples` unconditional samples, `fn` gets None) in batches of `batch_size`. Batch b draws with
    fold_in(key, b); the last batch is padded by repeating its last condition, so `fn` compiles once; the next
    batch is dispatched before the previous one is copied to the host. Only the `IMAGE_KEYS` outputs are kept."""
    total = num_samples if conds is None else len(conds)
    parts: dict[str, list[np.ndarray]] = {}

    def collect(out: dict[str, jax.Array], count: int) -> None:
        for name in IMAGE_KEYS:
            if name in out:
                parts.setdefault(name, []).append(to_uint8(jax.device_get(out[name][:count])))

    pending = None
    for b, start in enumerate(range(0, total, batch_size)):
        count = min(batch_size, total - start)
        chunk = None if conds is None else _pad(jnp.asarray(conds[start:start + count]), batch_size)
        out = fn(chunk, jax.random.fold_in(key, b))
        if pending is not None:
            collect(*pending)
        pending = (out, count)
    collect(*pending)
    return {name: np.concatenate(arrays) for name, arrays in parts.items()}
