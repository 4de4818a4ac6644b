"""Sampling from the AR transformer: one jitted scan over a preallocated KV cache (top-k/top-p, guidance)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpwave.models.transformer.model import ARTransformer, TransformerConfig


def check_sampling(temperature: Any, top_k: Any, top_p: Any, vocab_size: int) -> tuple[int | None, float | None]:
    """Refuses sampling settings no draw can use; returns (top_k, top_p) with 0 and 1.0 (no filtering) as None.
    The one check of these settings: the config's (`settings.read`), `Generator`'s and `sample`'s."""
    top_k = None if top_k == 0 else top_k
    top_p = None if top_p == 1.0 else top_p
    if isinstance(temperature, bool) or not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature={temperature!r} must be a number > 0")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= vocab_size):
        raise ValueError(f"top_k={top_k!r} must be an int in [1, vocab_size={vocab_size}], or None/0 (no top-k)")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p < 1):
        raise ValueError(f"top_p={top_p!r} must be in (0, 1), or None/1.0 (no nucleus filtering)")
    return top_k, top_p


def filter_logits(logits: jax.Array, top_k: int | None = None, top_p: float | None = None) -> jax.Array:
    """Sets logits outside the top-k, then outside the top-p nucleus, to -inf (ties kept)."""
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        ordered = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p: token i stays if the mass before it < top_p.
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
        cutoff = jnp.take_along_axis(ordered, keep.sum(-1, keepdims=True) - 1, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def scale_vocab_mask(cfg: TransformerConfig, position: jax.Array | int) -> jax.Array:
    """Tokens position ``position`` may take: with ``scale_boundaries`` (the all-scales model), only its
    own scale's ids ``[s*K, (s+1)*K)``, K = vocab_size / scales (the tokenizer's per-scale offsets)."""
    ids = jnp.arange(cfg.vocab_size)
    if cfg.scale_boundaries is None:
        return jnp.ones_like(ids, bool)
    per_scale = cfg.vocab_size // len(cfg.scale_boundaries)
    scale = jnp.searchsorted(jnp.asarray(cfg.scale_boundaries), position, side="right")
    return ids // per_scale == scale


def guide(cond_logits: jax.Array, uncond_logits: jax.Array, scale: jax.Array | float) -> jax.Array:
    """Classifier-free guidance ``cond + s * (cond - uncond)``: s = 0 is the conditional model.

    (Equivalently ``uncond + (1 + s) * (cond - uncond)``, Ho & Salimans' w = s.)
    """
    return cond_logits + scale * (cond_logits - uncond_logits)


@functools.partial(
    jax.jit, static_argnames=("graphdef", "num_tokens", "top_k", "top_p", "guided", "cached", "return_logits")
)
def _sample_jit(
    graphdef,
    params,
    cond,
    key,
    prefix,
    temperature,
    guidance_scale,
    *,
    num_tokens,
    top_k,
    top_p,
    guided,
    cached,
    return_logits,
):
    model = nnx.merge(graphdef, params)
    batch, start = prefix.shape
    double = (lambda x: jnp.concatenate([x, x])) if guided else (lambda x: x)
    cond = None if cond is None else double(cond)
    drop = double(jnp.zeros((batch,), bool))
    if guided:
        drop = drop.at[batch:].set(True)

    def pick(logits, t):
        if guided:
            logits = guide(logits[:batch], logits[batch:], guidance_scale)
        step_key = jax.random.fold_in(key, t)
        allowed = jnp.where(scale_vocab_mask(model.config, t), logits / temperature, -jnp.inf)
        token = jax.random.categorical(step_key, filter_logits(allowed, top_k, top_p))
        return token.astype(jnp.int32), logits

    tokens = jnp.zeros((batch, num_tokens), jnp.int32).at[:, :start].set(prefix)
    if cached:
        ctx = model.condition(cond, drop)
        cache = model.init_cache(drop.shape[0], num_tokens)
        logits, cache, key_valid = model.prefill(ctx, double(prefix), cache)

        def step(carry, t):
            tokens, logits, cache = carry
            token, used = pick(logits, t)
            logits, cache = model.decode_step(double(token), t + 1, cache, key_valid)
            return (tokens.at[:, t].set(token), logits, cache), used

        (tokens, logits, _), used = jax.lax.scan(step, (tokens, logits, cache), jnp.arange(start, num_tokens - 1))
        token, last = pick(logits, num_tokens - 1)
        tokens = tokens.at[:, -1].set(token)
        used = jnp.concatenate([used, last[None]])
    else:

        def step(tokens, t):
            logits = model.forward(double(tokens), cond, drop)[:, t]
            token, used = pick(logits, t)
            return tokens.at[:, t].set(token), used

        tokens, used = jax.lax.scan(step, tokens, jnp.arange(start, num_tokens))
    return (tokens, jnp.swapaxes(used, 0, 1)) if return_logits else tokens


def sample(
    model: ARTransformer | tuple[nnx.GraphDef, nnx.State],
    cond: jax.Array | None,
    key: jax.Array,
    *,
    num_tokens: int | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    guidance_scale: float = 0.0,
    prefix: jax.Array | None = None,
    batch_size: int | None = None,
    return_logits: bool = False,
    cached: bool = True,
):
    """Samples tokens (B, num_tokens) int32 with a preallocated KV cache (one jitted scan).

    ``cond``: labels (B,), caption bytes (B, L) or None (then ``batch_size``). ``prefix``
    (B, K): given first tokens (e.g. coarse scales). ``guidance_scale`` s != 0 batches the
    conditional and null-conditioned passes together and samples from ``guide``. Step t
    draws with ``fold_in(key, t)``. ``return_logits`` also returns the (guided, untempered)
    logits of the generated positions, (B, num_tokens - K, V). ``cached=False`` recomputes the
    full sequence at every step instead (the reference; same draws).
    """
    if isinstance(model, tuple):
        graphdef, params = model
        cfg = nnx.merge(graphdef, params).config
    else:
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        if jax.tree.leaves(rest):
            raise ValueError("ARTransformer should hold parameters only; found non-Param state")
        cfg = model.config
    num_tokens = cfg.seq_len if num_tokens is None else int(num_tokens)
    if not 1 <= num_tokens <= cfg.seq_len:
        raise ValueError(f"num_tokens must be in [1, {cfg.seq_len}], got {num_tokens}")
    top_k, top_p = check_sampling(temperature, top_k, top_p, cfg.vocab_size)
    if guidance_scale and cfg.conditioning == "none":
        raise ValueError(f"guidance_scale={guidance_scale} needs a conditional model")
    if cond is not None:
        batch = int(np.shape(cond)[0])
    elif prefix is not None:
        batch = int(np.shape(prefix)[0])
    elif batch_size is not None:
        batch = int(batch_size)
    else:
        raise ValueError("an unconditional model needs batch_size= (or a prefix) to sample")
    prefix = jnp.zeros((batch, 0), jnp.int32) if prefix is None else jnp.asarray(prefix, jnp.int32)
    if prefix.ndim != 2 or prefix.shape[0] != batch or prefix.shape[1] >= num_tokens:
        raise ValueError(f"prefix must be int ({batch}, K) with K < num_tokens={num_tokens}, got {prefix.shape}")
    return _sample_jit(
        graphdef,
        params,
        None if cond is None else jnp.asarray(cond),
        key,
        prefix,
        jnp.float32(temperature),
        jnp.float32(guidance_scale),
        num_tokens=num_tokens,
        top_k=top_k,
        top_p=None if top_p is None else float(top_p),
        guided=bool(guidance_scale),
        cached=cached,
        return_logits=return_logits,
    )
