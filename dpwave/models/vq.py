"""Vector quantizer with factorized, l2-normalized codes (ViT-VQGAN / "improved VQGAN", Yu et al. 2022).

Encoder outputs are projected to a small ``code_dim`` and l2-normalized; the codebook rows are
l2-normalized at lookup, so the nearest code is the one of largest cosine similarity. The codebook is
learned either by gradients (``nnx.Param``, codebook + commitment losses) or by an exponential moving
average of the encoder outputs assigned to each code (``CodebookEma``, a non-``Param`` variable that
gradients never touch). Both modes keep an EMA of each code's assignment frequency (``CodeUsage``);
codes whose frequency falls below a fraction of the uniform share ``1 / codebook_size`` are restarted
from random encoder outputs of the current batch, so the codebook does not collapse.

Functional use: ``nnx.split(quantizer, nnx.Param, ...)`` puts the gradient-mode codebook in the
params and the EMA codebook and usage in the rest.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

CODEBOOK_UPDATES = ("ema", "gradient")


class CodebookEma(nnx.Variable):
    """EMA codebook rows (unnormalized running sums of assigned unit vectors); not a ``Param``."""


class CodeUsage(nnx.Variable):
    """EMA of each code's share of assignments; sums to 1 and starts uniform."""


class Quantized(NamedTuple):
    """Output of ``VectorQuantizer.__call__``.

    Attributes:
      latents: l2-normalized encoder outputs, (..., code_dim).
      quantized: the chosen codes with a straight-through gradient to ``latents``, (..., code_dim).
      codes: int32 code indices, (...).
      codebook_loss: mean squared distance of the chosen codes to the stopped latents (0 in EMA mode).
      commitment_loss: mean squared distance of the latents to the stopped codes.
    """

    latents: jax.Array
    quantized: jax.Array
    codes: jax.Array
    codebook_loss: jax.Array
    commitment_loss: jax.Array


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Unit vectors along the last axis (zero vectors stay finite)."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


class VectorQuantizer(nnx.Module):
    """Nearest-code (cosine) quantizer over ``codebook_size`` unit vectors of size ``code_dim``."""

    def __init__(self, codebook_size: int, code_dim: int, *, update: str, rngs: nnx.Rngs):
        if update not in CODEBOOK_UPDATES:
            raise ValueError(f"codebook update {update!r} is unknown; use one of {CODEBOOK_UPDATES}")
        rows = l2_normalize(jax.random.normal(rngs.params(), (codebook_size, code_dim), jnp.float32))
        self.update = update
        self.codebook = nnx.Param(rows) if update == "gradient" else CodebookEma(rows)
        self.usage = CodeUsage(jnp.full((codebook_size,), 1.0 / codebook_size, jnp.float32))

    @property
    def codebook_size(self) -> int:
        return self.codebook.value.shape[0]

    def codes(self) -> jax.Array:
        """The normalized codebook, (codebook_size, code_dim)."""
        return l2_normalize(self.codebook.value)

    def lookup(self, codes: jax.Array) -> jax.Array:
        """Code vectors of integer ``codes`` (any shape) -> (..., code_dim); out-of-range ids are clipped."""
        return jnp.take(self.codes(), codes, axis=0, mode="clip")

    def __call__(self, z: jax.Array) -> Quantized:
        """Quantizes encoder outputs ``z`` (..., code_dim) (normalized here)."""
        latents = l2_normalize(z.astype(jnp.float32))
        book = self.codes()
        codes = jnp.argmax(latents @ book.T, axis=-1).astype(jnp.int32)
        chosen = jnp.take(book, codes, axis=0)
        commitment = jnp.mean(jnp.sum((latents - jax.lax.stop_gradient(chosen)) ** 2, axis=-1))
        if self.update == "gradient":
            codebook_loss = jnp.mean(jnp.sum((jax.lax.stop_gradient(latents) - chosen) ** 2, axis=-1))
        else:
            codebook_loss = jnp.zeros((), jnp.float32)
        quantized = latents + jax.lax.stop_gradient(chosen - latents)
        return Quantized(latents, quantized, codes, codebook_loss, commitment)

    def update_codebook(
        self, latents: jax.Array, codes: jax.Array, key: jax.Array, *, decay: float, dead_threshold: float
    ) -> jax.Array:
        """One training step of codebook bookkeeping (call outside the gradient, with stopped inputs).

        Updates the usage EMA; in EMA mode moves each used code toward the mean of its assigned latents;
        then restarts every code whose usage is below ``dead_threshold / codebook_size`` at a random
        latent of this batch (its usage is reset to uniform). Returns the number of restarted codes.
        """
        size = self.codebook_size
        flat = jax.lax.stop_gradient(latents).reshape(-1, latents.shape[-1])
        one_hot = jax.nn.one_hot(codes.reshape(-1), size, dtype=jnp.float32)
        counts = one_hot.sum(axis=0)
        usage = decay * self.usage.value + (1.0 - decay) * counts / flat.shape[0]
        rows = self.codebook.value
        if self.update == "ema":
            rows = decay * rows + (1.0 - decay) * (one_hot.T @ flat)
        dead = usage < dead_threshold / size
        picks = jax.random.randint(key, (size,), 0, flat.shape[0])
        rows = jnp.where(dead[:, None], flat[picks], rows)
        self.codebook.value = rows
        self.usage.value = jnp.where(dead, 1.0 / size, usage)
        return jnp.sum(dead).astype(jnp.int32)


class CodebookUsage(NamedTuple):
    """How a set of codes spreads over a codebook.

    Attributes:
      fraction_used: share of the codebook's entries that occur at least once.
      perplexity: ``exp(entropy)`` of the empirical code distribution (1 = one code, ``size`` = uniform).
    """

    fraction_used: float
    perplexity: float


def codebook_usage(codes: jax.Array, codebook_size: int) -> CodebookUsage:
    """Usage statistics of integer ``codes`` (any shape, values in ``[0, codebook_size)``)."""
    codes = jnp.asarray(codes).reshape(-1)
    if codes.size == 0:
        raise ValueError("codebook_usage needs at least one code; got an empty array")
    if int(codes.min()) < 0 or int(codes.max()) >= codebook_size:
        raise ValueError(
            f"codes span [{int(codes.min())}, {int(codes.max())}], outside [0, {codebook_size}); "
            "pass per-scale codes without the vocabulary offset"
        )
    counts = jnp.bincount(codes, length=codebook_size)
    probs = counts / codes.size
    entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0))
    return CodebookUsage(float(jnp.mean(counts > 0)), float(jnp.exp(entropy)))
