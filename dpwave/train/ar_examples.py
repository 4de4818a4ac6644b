"""The AR model's examples and initialization, shared by the stages that train it (pretrain, dp_finetune) and
the sample stage: every image's tokens under the frozen tokenizer with its condition."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpwave import data
from dpwave.data.prefetch import prefetched
from dpwave.models import tokenizer as tokenizer_lib
from dpwave.models import transformer as transformer_lib
from dpwave.models.text import encode_captions
from dpwave.train.settings import Settings


@functools.partial(jax.jit, static_argnums=(0, 3))
def _encode(graphdef, state, images, coarse):
    return nnx.merge(graphdef, state).encode(images, "coarse" if coarse else "all")


def encode_examples(settings: Settings, tokenizer: tokenizer_lib.SpectralTokenizer, source: data.Source,
                    batch_size: int = 250) -> dict[str, np.ndarray]:
    """The AR model's examples: every image's tokens under the frozen tokenizer (a per-example map: coarse scale
    only, or all scales for full_dp) and its condition (label or caption bytes). Chunks are decoded on the
    `perf.input_workers` threads while the tokenizer encodes the previous ones."""
    graphdef, state = nnx.split(tokenizer)
    parts: dict[str, list[np.ndarray]] = {"tokens": [], "label": [], "caption_bytes": []}

    def chunk(c: int) -> tuple[int, dict[str, np.ndarray]]:
        idx = np.arange(c * batch_size, min((c + 1) * batch_size, len(source)))
        return len(idx), source.get_batch(np.pad(idx, (0, batch_size - len(idx)), mode="edge"))

    perf = settings.perf
    with prefetched(chunk, 0, -(-len(source) // batch_size), workers=perf.input_workers,
                    depth=perf.input_prefetch) as chunks:
        for count, raw in chunks:
            tokens = _encode(graphdef, state, jnp.asarray(data.to_float(raw["image"])), settings.coarse_only)
            parts["tokens"].append(np.asarray(tokens, np.int32)[:count])
            if settings.data.condition == "label":
                parts["label"].append(np.asarray(raw["label"], np.int32)[:count])
            elif settings.data.condition == "caption":
                captions = [str(c) for c in raw["caption"][:count]]
                parts["caption_bytes"].append(encode_captions(captions, settings.transformer.max_text_len))
    return {k: np.concatenate(v) for k, v in parts.items() if v}


def init_transformer(config: transformer_lib.TransformerConfig, key: jax.Array) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, params) of a freshly initialized AR model."""
    model = transformer_lib.ARTransformer(config, rngs=nnx.Rngs(params=key))
    return nnx.split(model, nnx.Param)
