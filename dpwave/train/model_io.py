"""Model I/O the stages share: random streams, data-parallel slices, restoring a stage's parameters, the AR
model's examples."""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpwave import data
from dpwave.data.prefetch import prefetched
from dpwave.models import tokenizer as tokenizer_lib
from dpwave.models import transformer as transformer_lib
from dpwave.models.text import encode_captions
from dpwave.train import loop
from dpwave.train.checkpoint import Checkpointer
from dpwave.train.settings import Settings


def stage_key(seed: int, stream: int) -> jax.Array:
    """The key of a stage's random stream: fold_in(key(config.seed), stream)."""
    return jax.random.fold_in(jax.random.key(seed), stream)


def local_slice(indices: np.ndarray) -> np.ndarray:
    """This process's contiguous share of a global batch of indices (all processes draw the same)."""
    return np.asarray(indices).reshape(jax.process_count(), -1)[jax.process_index()]


def shuffled(seed: int, stream: int, size: int, batch_size: int, section: str) -> data.ShuffleSampler:
    """A public stage's data order: fixed-size batches of a fresh permutation each epoch, a function of (seed,
    stream, step)."""
    if batch_size % jax.device_count():
        raise ValueError(f"config.{section}.batch_size={batch_size} must be a multiple of the device count "
                         f"({jax.device_count()}) for data parallelism")
    return data.ShuffleSampler(size, batch_size, seed=seed * 100 + stream)


def restore_state(stage_dir: str, template: Any) -> Any:
    """The newest state checkpointed in `stage_dir`, restored against `template` (the stage's initial state)."""
    with Checkpointer(f"{stage_dir}/checkpoints") as ckpt:
        restored = ckpt.restore_latest(template)
    if restored is None:
        raise FileNotFoundError(f"no checkpoint under {stage_dir}/checkpoints; run that stage first")
    return restored[1]


def init_source(path: str, stage: str) -> tuple[str, str]:
    """(stage directory, params_sha256) of the finished `stage` that `<stage>.init_params_from=path` names: the
    stage's own directory, or a workdir holding it."""
    for candidate in (path, os.path.join(path, stage)):
        summary = loop.read_summary(candidate)
        if summary is None:
            continue
        if summary.get("stage") != stage:
            raise ValueError(f"config.{stage}.init_params_from={path!r} is a finished {summary.get('stage')!r} stage; "
                             f"it needs a finished {stage!r} stage directory or a workdir holding one")
        return candidate, summary["params_sha256"]
    raise ValueError(f"config.{stage}.init_params_from={path!r} holds no finished {stage!r} stage (no "
                     f"{os.path.join(path, 'summary.json')} nor {os.path.join(path, stage, 'summary.json')}); point "
                     "it at a finished stage directory or a workdir")


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
