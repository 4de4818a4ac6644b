"""The model: a decoder-only autoregressive transformer over wavelet tokens (Flax NNX).

Sequence layout, with P condition-prefix positions and T tokens::

    position:  0 .. P-1           P            P+1        ...  P+T-1
    input:     caption states     BOS + cond   emb(x_0)   ...  emb(x_{T-2})
    predicts:  -                  x_0          x_1        ...  x_{T-1}

A class label (or the learned null condition of classifier-free guidance) is added
to the BOS slot (P = 0). A caption is read by a small bidirectional transformer over
UTF-8 bytes whose states form the prefix (P = max_text_len, padding masked out) and
whose mean is added to the BOS slot. Tokens are ordered coarse -> fine, so the plain
causal mask is scale-causal for the all-scales baseline, which also adds a learned
embedding of the scale of the predicted token (``scale_boundaries``).

Functional use: ``graphdef, params, rest = nnx.split(model, nnx.Param, ...)`` leaves
``rest`` empty (the model holds parameters only); every random choice (dropout,
condition dropout, sampling) takes an explicit key.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.extend.backend
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpwave.models.lora import Dense
from dpwave.models.text import TEXT_PAD, TEXT_VOCAB_SIZE
from dpwave.validation import check_int

_DTYPES = ("float32", "bfloat16", "float16")
_NORMS = ("layernorm", "rmsnorm")
# Kernels of `jax.nn.dot_product_attention`; None picks cudnn where it applies (`_attention_impl`), else xla.
ATTENTION_IMPLS = ("xla", "cudnn")
_CUDNN_DTYPES = ("bfloat16", "float16")
# LoRA targets: the attention projections q, k, v, o and the MLP (fc1, fc2) of every block, '+'-joined
# ("q+v"); "qv" and "all" (every projection and the MLP) are aliases.
LORA_TARGETS = ("q", "k", "v", "o", "mlp")
_LORA_ALIASES = {"qv": ("q", "v"), "all": LORA_TARGETS}
_INIT_STD = 0.02


def _check_int(name: str, value: Any, minimum: int) -> None:
    check_int(f"TransformerConfig.{name}", value, minimum)


def _check_rate(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"TransformerConfig.{name} must be in [0, 1), got {value!r}")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Architecture of ``ARTransformer``; hashable, so a graphdef holding it is a static jit argument.

    Conditioning: ``num_classes`` (class labels), or ``max_text_len > 0`` (captions as
    UTF-8 bytes, encoded by ``text_depth`` bidirectional blocks), or neither.
    ``cond_dropout``: probability, in training, of replacing an example's condition by
    the learned null condition. ``dtype``: activation dtype (params are float32).
    ``lora_rank > 0`` adds adapters to the projections named in ``lora_targets``, a '+'-joined
    subset of ``LORA_TARGETS`` (q, k, v, o: attention projections; mlp: both MLP layers), e.g.
    ``"q+v"`` (alias ``"qv"``) or ``"all"`` (every dense layer of the blocks), scaled by
    ``lora_alpha / lora_rank`` (alpha defaults to the rank). ``scale_boundaries``: cumulative end index of each
    wavelet scale's tokens, e.g. ``(16, 32, 48)``; the last must equal ``seq_len``.
    ``attention_impl``: the kernel of ``jax.nn.dot_product_attention``, ``"xla"``, ``"cudnn"`` (cuDNN flash
    attention: CUDA GPU, bfloat16 or float16 activations, head dim a multiple of 8) or None (cudnn where it
    applies, else xla). It changes results only by float rounding, so stage fingerprints leave it out
    (``metadata={"fingerprint": False}``, honoured by ``dpwave.train.fingerprints.jsonable``).
    ``scan_blocks``: the decoder's ``depth`` blocks hold stacked weights (a leading ``depth`` axis) and run as one
    ``jax.lax.scan``, so XLA compiles one block instead of ``depth`` (deep models: the paper configs); the same
    initial weights and function as the unrolled blocks, but another parameter layout (a stage input).
    """

    vocab_size: int
    seq_len: int
    width: int = 256
    depth: int = 4
    num_heads: int = 4
    mlp_dim: int = 1024
    num_classes: int | None = None
    max_text_len: int = 0
    text_depth: int = 2
    cond_dropout: float = 0.0
    dropout: float = 0.0
    dtype: str = "float32"
    norm: str = "layernorm"
    tie_embeddings: bool = False
    lora_rank: int = 0
    lora_alpha: float | None = None
    lora_targets: str = "qv"
    scale_boundaries: tuple[int, ...] | None = None
    attention_impl: str | None = dataclasses.field(default=None, metadata={"fingerprint": False})
    scan_blocks: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "seq_len", "width", "depth", "num_heads", "mlp_dim", "text_depth"):
            _check_int(name, getattr(self, name), 1)
        _check_int("vocab_size", self.vocab_size, 2)
        _check_int("max_text_len", self.max_text_len, 0)
        _check_int("lora_rank", self.lora_rank, 0)
        if self.width % self.num_heads:
            raise ValueError(
                f"TransformerConfig.width={self.width} must be divisible by "
                f"num_heads={self.num_heads}; pick a width that is a multiple of it"
            )
        if self.num_classes is not None:
            _check_int("num_classes", self.num_classes, 1)
            if self.max_text_len:
                raise ValueError(
                    "TransformerConfig: set either num_classes (labels) or max_text_len "
                    f"(captions), not both (got {self.num_classes} and {self.max_text_len})"
                )
        _check_rate("cond_dropout", self.cond_dropout)
        _check_rate("dropout", self.dropout)
        if self.cond_dropout and self.conditioning == "none":
            raise ValueError(
                f"TransformerConfig.cond_dropout={self.cond_dropout} needs a condition: "
                "set num_classes or max_text_len, or cond_dropout=0"
            )
        try:
            dtype = jnp.dtype(self.dtype).name
        except TypeError:
            dtype = str(self.dtype)
        if dtype not in _DTYPES:
            raise ValueError(f"TransformerConfig.dtype must be one of {_DTYPES}, got {self.dtype!r}")
        object.__setattr__(self, "dtype", dtype)
        if self.norm not in _NORMS:
            raise ValueError(f"TransformerConfig.norm must be one of {_NORMS}, got {self.norm!r}")
        lora_targets(self.lora_targets)
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ValueError(f"TransformerConfig.lora_alpha must be > 0 or None, got {self.lora_alpha!r}")
        if self.scale_boundaries is not None:
            bounds = tuple(int(b) for b in self.scale_boundaries)
            if (
                not bounds
                or bounds[0] < 1
                or any(b <= a for a, b in zip(bounds, bounds[1:]))
                or bounds[-1] != self.seq_len
            ):
                raise ValueError(
                    f"TransformerConfig.scale_boundaries={self.scale_boundaries!r} must be "
                    f"strictly increasing cumulative token counts ending at seq_len="
                    f"{self.seq_len}, e.g. (16, 32, {self.seq_len})"
                )
            object.__setattr__(self, "scale_boundaries", bounds)
        if self.attention_impl is not None and self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"TransformerConfig.attention_impl must be None (automatic) or one of {ATTENTION_IMPLS}, "
                f"got {self.attention_impl!r}"
            )
        if self.attention_impl == "cudnn" and (dtype not in _CUDNN_DTYPES or (self.width // self.num_heads) % 8):
            raise ValueError(
                f"TransformerConfig.attention_impl='cudnn' needs dtype in {_CUDNN_DTYPES} and a head dim "
                f"(width / num_heads) that is a multiple of 8; got dtype={dtype!r}, head dim "
                f"{self.width // self.num_heads}; use attention_impl=None or 'xla'"
            )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TransformerConfig:
        """Builds a config from a dict or ml_collections ConfigDict, refusing unknown keys."""
        values = dict(values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TransformerConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**values)

    @property
    def conditioning(self) -> str:
        """``"class"``, ``"text"`` or ``"none"``."""
        if self.num_classes is not None:
            return "class"
        return "text" if self.max_text_len else "none"

    @property
    def prefix_len(self) -> int:
        """Number of condition positions before the BOS slot."""
        return self.max_text_len if self.conditioning == "text" else 0


def lora_targets(spec: str) -> frozenset[str]:
    """The projections a ``lora_targets`` spec names: ``"q+v"`` -> {"q", "v"}; aliases "qv" and "all"."""
    if spec in _LORA_ALIASES:
        return frozenset(_LORA_ALIASES[spec])
    names = spec.split("+") if isinstance(spec, str) else []
    if not names or any(n not in LORA_TARGETS for n in names):
        raise ValueError(
            f"TransformerConfig.lora_targets={spec!r}: use a '+'-joined subset of {LORA_TARGETS} (e.g. 'q+v') "
            f"or one of {tuple(_LORA_ALIASES)}"
        )
    return frozenset(names)


@functools.cache
def _scale_ids(boundaries: tuple[int, ...]) -> np.ndarray:
    """Scale index of each token position, from cumulative boundaries."""
    return np.searchsorted(np.asarray(boundaries), np.arange(boundaries[-1]), side="right").astype(np.int32)


def _fold(key: jax.Array | None, i: int) -> jax.Array | None:
    return None if key is None else jax.random.fold_in(key, i)


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def _make_norm(cfg: TransformerConfig, rngs: nnx.Rngs) -> nnx.Module:
    norm_cls = nnx.LayerNorm if cfg.norm == "layernorm" else nnx.RMSNorm
    return norm_cls(cfg.width, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.float32, rngs=rngs)


def _embedding(rngs: nnx.Rngs, *shape: int) -> nnx.Param:
    return nnx.Param(jax.nn.initializers.normal(_INIT_STD)(rngs.params(), shape, jnp.float32))


@functools.cache
def _cuda_flash_capable() -> bool:
    """Whether the default backend is a CUDA GPU of compute capability 8.0 (Ampere) or newer."""
    if jax.default_backend() != "gpu" or "cuda" not in jax.extend.backend.get_backend().platform_version.lower():
        return False
    return int(str(jax.devices()[0].compute_capability).split(".")[0]) >= 8


def _attention_impl(requested: str | None, q: jax.Array, num_keys: int, masked: bool) -> str:
    """``requested``, or for None: cudnn where cuDNN flash attention takes these inputs, else xla.

    cuDNN needs a CUDA GPU, 16-bit inputs and a head dim that is a multiple of 8 and at most 128; a mask
    becomes an additive bias, whose gradient needs even query and key lengths.
    """
    if requested is not None:
        return requested
    _, num_queries, _, head_dim = q.shape
    fits = (
        jnp.dtype(q.dtype).name in _CUDNN_DTYPES
        and head_dim % 8 == 0
        and head_dim <= 128
        and not (masked and (num_queries % 2 or num_keys % 2))
    )
    return "cudnn" if fits and _cuda_flash_capable() else "xla"


class Attention(nnx.Module):
    """Multi-head self-attention through ``jax.nn.dot_product_attention``; optionally writes keys/values into a
    preallocated cache."""

    def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
        def dense(name: str) -> Dense:
            rank = cfg.lora_rank if name in lora_targets(cfg.lora_targets) else 0
            return Dense(cfg.width, cfg.width, rngs=rngs, dtype=cfg.dtype, lora_rank=rank, lora_alpha=cfg.lora_alpha)

        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (dense(n) for n in "qkvo")
        self.num_heads = cfg.num_heads
        self.impl = cfg.attention_impl

    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None,
        *,
        causal: bool,
        cache: tuple[jax.Array, jax.Array] | None = None,
        index: jax.Array | int = 0,
    ):
        """x (B, N, D); mask bool (B, 1, N, K) over the K keys (K = N, or the cache length), or None.

        ``causal``: query i also sees only keys j <= i (on top of ``mask``). With a cache ((B, K, heads,
        head_dim) keys and values: the layout the attention reads without a transpose), the N new
        keys/values are written at positions [index, index + N). A query with no visible key gets a
        uniform row; such positions are themselves invalid keys, so no valid position reads their output.
        Returns (output (B, N, D), updated cache or None).
        """
        b, n, d = x.shape
        heads = lambda y: y.reshape(b, n, self.num_heads, d // self.num_heads)
        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        if cache is not None:
            k = jax.lax.dynamic_update_slice_in_dim(cache[0], k.astype(cache[0].dtype), index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cache[1], v.astype(cache[1].dtype), index, axis=1)
            cache = (k, v)
        impl = _attention_impl(self.impl, q, k.shape[1], mask is not None)
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation=impl)
        return self.o_proj(out.reshape(b, n, d)), cache


class Mlp(nnx.Module):
    def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
        rank = cfg.lora_rank if "mlp" in lora_targets(cfg.lora_targets) else 0
        kw = dict(rngs=rngs, dtype=cfg.dtype, lora_rank=rank, lora_alpha=cfg.lora_alpha)
        self.fc1 = Dense(cfg.width, cfg.mlp_dim, **kw)
        self.fc2 = Dense(cfg.mlp_dim, cfg.width, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x)))


class Block(nnx.Module):
    """Pre-norm transformer block: x + Attn(Norm(x)), then x + Mlp(Norm(x))."""

    def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
        self.attn_norm = _make_norm(cfg, rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = _make_norm(cfg, rngs)
        self.mlp = Mlp(cfg, rngs)
        self.dropout = cfg.dropout

    def __call__(self, x, mask, *, causal, key=None, cache=None, index=0):
        h, cache = self.attn(self.attn_norm(x), mask, causal=causal, cache=cache, index=index)
        x = x + _dropout(h, self.dropout, _fold(key, 0))
        x = x + _dropout(self.mlp(self.mlp_norm(x)), self.dropout, _fold(key, 1))
        return x, cache


class TextEncoder(nnx.Module):
    """Bidirectional transformer over caption bytes (``dpwave.models.text.encode_captions``)."""

    def __init__(self, cfg: TransformerConfig, rngs: nnx.Rngs):
        self.byte_embed = _embedding(rngs, TEXT_VOCAB_SIZE, cfg.width)
        self.pos_embed = _embedding(rngs, cfg.max_text_len, cfg.width)
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.text_depth)])
        self.norm = _make_norm(cfg, rngs)
        self.dtype, self.dropout = cfg.dtype, cfg.dropout

    def __call__(self, text: jax.Array, *, key: jax.Array | None = None):
        """text int (B, L) -> (states (B, L, D), valid bool (B, L))."""
        valid = text != TEXT_PAD
        x = (jnp.take(self.byte_embed[...], text, axis=0) + self.pos_embed[...]).astype(self.dtype)
        x = _dropout(x, self.dropout, _fold(key, len(self.blocks)))
        mask = jnp.broadcast_to(valid[:, None, None, :], (text.shape[0], 1, text.shape[1], text.shape[1]))
        for i, block in enumerate(self.blocks):
            x, _ = block(x, mask, causal=False, key=_fold(key, i))
        return self.norm(x), valid


class Context(NamedTuple):
    """The condition as decoder input: prefix states (B, P, D), their validity (B, P), BOS (B, D)."""

    prefix: jax.Array
    valid: jax.Array
    bos: jax.Array


# Keys and values of each decoder block: one (B, K, heads, head_dim) pair per block, or with `scan_blocks` one pair
# stacked over the blocks, (depth, B, K, heads, head_dim).
Cache = list[tuple[jax.Array, jax.Array]] | tuple[jax.Array, jax.Array]


def _stacked_blocks(cfg: TransformerConfig, rngs: nnx.Rngs) -> Block:
    """One Block whose parameters stack those of ``depth`` blocks built in turn (the unrolled model's draws)."""
    blocks = [Block(cfg, rngs) for _ in range(cfg.depth)]
    stacked = jax.tree.map(lambda *layers: jnp.stack(layers), *(nnx.state(b) for b in blocks))
    nnx.update(blocks[0], stacked)
    return blocks[0]


class ARTransformer(nnx.Module):
    """Decoder-only transformer: ``model(tokens (B, T) int, cond) -> logits (B, T, V) float32``.

    ``logits[:, t]`` predicts ``tokens[:, t]`` from ``tokens[:, :t]`` and the condition;
    ``cond`` is labels int (B,), caption bytes int (B, max_text_len), or None.
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        cfg = self.config = config
        self.token_embed = _embedding(rngs, cfg.vocab_size, cfg.width)
        self.pos_embed = _embedding(rngs, cfg.seq_len, cfg.width)
        self.bos = _embedding(rngs, cfg.width)
        self.scale_embed = _embedding(rngs, len(cfg.scale_boundaries), cfg.width) if cfg.scale_boundaries else None
        # Class table row num_classes is the null condition.
        self.class_embed = _embedding(rngs, cfg.num_classes + 1, cfg.width) if cfg.conditioning == "class" else None
        self.text_encoder = TextEncoder(cfg, rngs) if cfg.conditioning == "text" else None
        self.null_embed = _embedding(rngs, cfg.width) if cfg.conditioning == "text" else None
        if cfg.scan_blocks:
            self.blocks = _stacked_blocks(cfg, rngs)
        else:
            self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.depth)])
        self.final_norm = _make_norm(cfg, rngs)
        self.head = None if cfg.tie_embeddings else Dense(cfg.width, cfg.vocab_size, rngs=rngs, dtype=cfg.dtype)

    # ---- training / scoring -------------------------------------------------------------------
    def __call__(
        self, tokens: jax.Array, cond: jax.Array | None = None, *, train: bool = False, key: jax.Array | None = None
    ) -> jax.Array:
        """Logits (B, T, V). ``train=True`` applies dropout and condition dropout from ``key``."""
        cfg = self.config
        tokens = self._check_tokens(tokens)
        use_dropout, use_cond_dropout = train and cfg.dropout > 0, train and cfg.cond_dropout > 0
        if (use_dropout or use_cond_dropout) and key is None:
            raise ValueError("train=True with dropout or cond_dropout > 0 needs an explicit key=")
        drop = jnp.zeros((tokens.shape[0],), bool)
        if use_cond_dropout:
            drop = jax.random.bernoulli(_fold(key, 0), cfg.cond_dropout, drop.shape)
        return self.forward(tokens, cond, drop, key=_fold(key, 1) if use_dropout else None)

    def forward(
        self, tokens: jax.Array, cond: jax.Array | None, drop: jax.Array, *, key: jax.Array | None = None
    ) -> jax.Array:
        """Logits (B, T, V) with an explicit per-example null-condition mask ``drop`` (B,) bool.

        ``key`` (or None) drives dropout only.
        """
        tokens = self._check_tokens(tokens)
        ctx = self.condition(cond, drop, key=_fold(key, 0))
        x = jnp.concatenate([ctx.prefix, self._inputs(ctx, tokens[:, :-1])], axis=1)
        x = _dropout(x, self.config.dropout, _fold(key, 1))
        mask = _prefix_mask(ctx.valid, x.shape[1], x.shape[1])
        hidden, _ = self._blocks(x, mask, causal=True, key=_fold(key, 2))
        return self._logits(hidden[:, ctx.prefix.shape[1] :])

    def condition(self, cond: jax.Array | None, drop: jax.Array, *, key: jax.Array | None = None) -> Context:
        """Embeds the condition; rows with ``drop`` get the learned null condition."""
        cfg, batch = self.config, drop.shape[0]
        bos = jnp.broadcast_to(self.bos[...], (batch, cfg.width))
        empty = Context(jnp.zeros((batch, 0, cfg.width), cfg.dtype), jnp.zeros((batch, 0), bool), bos)
        if cfg.conditioning == "none":
            if cond is not None:
                raise ValueError("this model is unconditional (num_classes=None, max_text_len=0): pass cond=None")
            return empty
        if cond is None:
            raise ValueError(
                f"this model is {cfg.conditioning}-conditioned: pass cond "
                + ("labels int (B,)" if cfg.conditioning == "class" else f"caption bytes int (B, {cfg.max_text_len})")
            )
        if cfg.conditioning == "class":
            labels = jnp.where(drop, cfg.num_classes, _check_labels(cond, batch, cfg.num_classes))
            return empty._replace(bos=bos + jnp.take(self.class_embed[...], labels, axis=0))
        states, valid = self.text_encoder(_check_text(cond, batch, cfg.max_text_len), key=key)
        valid = valid & ~drop[:, None]
        weights = valid[..., None].astype(jnp.float32)
        pooled = (states.astype(jnp.float32) * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)
        cond_vec = jnp.where(drop[:, None], self.null_embed[...], pooled)
        return Context(states, valid, bos + cond_vec)

    # ---- cached decoding ----------------------------------------------------------------------
    def init_cache(self, batch: int, num_tokens: int) -> Cache:
        """Zero key/value caches, one (B, P + num_tokens, heads, head_dim) pair per block."""
        cfg = self.config
        shape = (batch, cfg.prefix_len + num_tokens, cfg.num_heads, cfg.width // cfg.num_heads)
        if cfg.scan_blocks:
            return jnp.zeros((cfg.depth, *shape), cfg.dtype), jnp.zeros((cfg.depth, *shape), cfg.dtype)
        return [(jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype)) for _ in self.blocks]

    def prefill(self, ctx: Context, tokens: jax.Array, cache: Cache):
        """Runs the condition, BOS and K given tokens (B, K) through the decoder, filling the cache.

        Returns (logits for token K (B, V), cache, key validity (B, cache length)).
        """
        x = jnp.concatenate([ctx.prefix, self._inputs(ctx, tokens)], axis=1)
        batch, length = cache[0][0].shape[:2]
        key_valid = jnp.concatenate([ctx.valid, jnp.ones((batch, length - ctx.valid.shape[1]), bool)], axis=1)
        mask = _prefix_mask(ctx.valid, x.shape[1], length)
        hidden, cache = self._blocks(x, mask, causal=True, cache=cache, index=0)
        return self._logits(hidden[:, -1]), cache, key_valid

    def decode_step(self, token: jax.Array, position: jax.Array, cache: Cache, key_valid: jax.Array):
        """Feeds ``token`` (B,) as the input of token-slot ``position`` (its index + 1).

        Returns (logits for token ``position`` (B, V), cache).
        """
        x = self._token_inputs(token[:, None], position[None])
        index = self.config.prefix_len + position
        hidden, cache = self._blocks(x, _cache_mask(key_valid, index, 1), causal=False, cache=cache, index=index)
        return self._logits(hidden[:, 0]), cache

    # ---- internals ----------------------------------------------------------------------------
    def _position(self, positions: jax.Array) -> jax.Array:
        emb = jnp.take(self.pos_embed[...], positions, axis=0)
        if self.scale_embed is not None:
            scales = jnp.asarray(_scale_ids(self.config.scale_boundaries))[positions]
            emb = emb + jnp.take(self.scale_embed[...], scales, axis=0)
        return emb

    def _token_inputs(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        emb = jnp.take(self.token_embed[...], tokens, axis=0) + self._position(positions)
        return emb.astype(self.config.dtype)

    def _inputs(self, ctx: Context, tokens: jax.Array) -> jax.Array:
        """[BOS + cond, emb(tokens)] at token slots 0 .. K."""
        bos = (ctx.bos + self._position(jnp.zeros((), jnp.int32)))[:, None].astype(self.config.dtype)
        rest = self._token_inputs(tokens, jnp.arange(1, tokens.shape[1] + 1))
        return jnp.concatenate([bos, rest], axis=1)

    def _blocks(self, x, mask, *, causal: bool, key=None, cache: Cache | None = None, index=0):
        if self.config.scan_blocks:
            return self._scanned_blocks(x, mask, causal=causal, key=key, cache=cache, index=index)
        new_cache = []
        for i, block in enumerate(self.blocks):
            x, layer_cache = block(x, mask, causal=causal, key=_fold(key, i), index=index,
                                   cache=None if cache is None else cache[i])
            new_cache.append(layer_cache)
        return self.final_norm(x), (None if cache is None else new_cache)

    def _scanned_blocks(self, x, mask, *, causal: bool, key=None, cache: Cache | None = None, index=0):
        """``_blocks`` over the stacked blocks: a scan whose step is block i with its weights, key ``_fold(key, i)``
        and cache slice."""
        graphdef, weights = nnx.split(self.blocks)
        keys = None if key is None else jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(self.config.depth))

        def step(x, layer):
            layer_weights, layer_key, layer_cache = layer
            return nnx.merge(graphdef, layer_weights)(x, mask, causal=causal, key=layer_key, cache=layer_cache,
                                                      index=index)

        x, new_cache = jax.lax.scan(step, x, (weights, keys, cache))
        return self.final_norm(x), new_cache

    def _logits(self, hidden: jax.Array) -> jax.Array:
        if self.head is not None:
            return self.head(hidden).astype(jnp.float32)
        return (hidden @ self.token_embed[...].astype(hidden.dtype).T).astype(jnp.float32)

    def _check_tokens(self, tokens: jax.Array) -> jax.Array:
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be int (B, T), got {tokens.dtype} {tokens.shape}")
        if not 1 <= tokens.shape[1] <= self.config.seq_len:
            raise ValueError(f"tokens have length {tokens.shape[1]}; this model takes 1..{self.config.seq_len}")
        return tokens


def _check_labels(labels: jax.Array, batch: int, num_classes: int) -> jax.Array:
    labels = jnp.asarray(labels)
    if labels.shape != (batch,) or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be int ({batch},), got {labels.dtype} {labels.shape}")
    if not isinstance(labels, jax.core.Tracer):
        bad = np.asarray(labels)[(np.asarray(labels) < 0) | (np.asarray(labels) >= num_classes)]
        if bad.size:
            raise ValueError(f"labels must be in [0, {num_classes}), got {bad[:5].tolist()}")
    return labels


def _check_text(text: jax.Array, batch: int, max_len: int) -> jax.Array:
    text = jnp.asarray(text)
    if text.shape != (batch, max_len) or not jnp.issubdtype(text.dtype, jnp.integer):
        raise ValueError(
            f"caption bytes must be int ({batch}, {max_len}) from "
            f"dpwave.models.text.encode_captions(..., max_len={max_len}), "
            f"got {text.dtype} {text.shape}"
        )
    return text


def _prefix_mask(prefix_valid: jax.Array, num_queries: int, num_keys: int) -> jax.Array | None:
    """(B, 1, N, S) validity of the keys (condition prefix, then always-valid token slots); None without a prefix.

    The causal part is ``is_causal`` of the attention, so that cuDNN can skip the masked half.
    """
    if prefix_valid.shape[1] == 0:
        return None
    batch, prefix = prefix_valid.shape
    valid = jnp.concatenate([prefix_valid, jnp.ones((batch, num_keys - prefix), bool)], axis=1)
    return jnp.broadcast_to(valid[:, None, None, :], (batch, 1, num_queries, num_keys))


def _cache_mask(key_valid: jax.Array, start: jax.Array | int, num_queries: int) -> jax.Array:
    """(B, 1, N, S): query at absolute position start + i sees valid keys at positions <= it."""
    queries = start + jnp.arange(num_queries)
    causal = jnp.arange(key_valid.shape[1])[None, :] <= queries[:, None]
    return causal[None, None] & key_valid[:, None, None, :]
