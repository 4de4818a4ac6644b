"""The public (non-DP) stages: tokenizer, AR pretraining, refiner.

Each refuses a private dataset before reading it (`require_public`), trains data-parallel over the
`data` mesh axis with a deterministic (seed, step) data order, and checkpoints through `loop.run`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from dpwave import data
from dpwave.models import refiner as refiner_lib
from dpwave.models import tokenizer as tokenizer_lib
from dpwave.models import transformer as transformer_lib
from dpwave.models.text import encode_captions
from dpwave.train import builders, distributed, loop, steps

# Independent randomness streams derived from config.seed.
STREAMS = {"tokenizer": 1, "pretrain": 2, "dp_finetune": 3, "refiner": 4, "sample": 5, "evaluate": 6}


def stage_key(config: ml_collections.ConfigDict, stage: str) -> jax.Array:
    return jax.random.fold_in(jax.random.key(config.seed), STREAMS[stage])


def local_slice(indices: np.ndarray) -> np.ndarray:
    """This process's contiguous share of a global batch of indices (all processes draw the same)."""
    return np.asarray(indices).reshape(jax.process_count(), -1)[jax.process_index()]


def run_task(config: ml_collections.ConfigDict, task: loop.Task, stage_dir: str, **kw: Any) -> loop.LoopResult:
    return loop.run(task, stage_dir, checkpoint_every=config.checkpoint.every_steps,
                    max_to_keep=config.checkpoint.max_to_keep, log_every=config.log_every_steps, **kw)


def _shuffled(config: ml_collections.ConfigDict, stage: str, size: int, batch_size: int) -> data.ShuffleSampler:
    if batch_size % jax.device_count():
        raise ValueError(f"config.{stage}.batch_size={batch_size} must be a multiple of the device count "
                         f"({jax.device_count()}) for data parallelism")
    return data.ShuffleSampler(size, batch_size, seed=config.seed * 100 + STREAMS[stage])


def restore_params(stage_dir: str, init_state: Any) -> Any:
    """The final state of a finished (or `init_from`) stage directory, restored against `init_state`."""
    from dpwave.train.checkpoint import Checkpointer

    with Checkpointer(f"{stage_dir}/checkpoints") as ckpt:
        restored = ckpt.restore_latest(init_state)
    if restored is None:
        raise FileNotFoundError(f"no checkpoint under {stage_dir}/checkpoints; run that stage first or fix init_from")
    return restored[1]


# -- tokenizer ----------------------------------------------------------------------------------------
def init_tokenizer(config: ml_collections.ConfigDict) -> tuple[nnx.GraphDef, Any, optax.GradientTransformation]:
    cfg = config.tokenizer
    model = tokenizer_lib.SpectralTokenizer(builders.tokenizer_config(config),
                                            rngs=nnx.Rngs(params=stage_key(config, "tokenizer")))
    optimizer = tokenizer_lib.make_optimizer(cfg.learning_rate, max(cfg.steps, 1))
    graphdef, state = tokenizer_lib.init_train_state(model, optimizer)
    return graphdef, state, optimizer


def tokenizer_task(config: ml_collections.ConfigDict, mesh: Mesh) -> loop.Task:
    source = builders.load(config, "public")
    data.require_public(source, "tokenizer training")
    graphdef, state, optimizer = init_tokenizer(config)
    if config.tokenizer.init_from:
        state = restore_params(config.tokenizer.init_from, state)
    state = distributed.replicate(state, mesh)
    sampler = _shuffled(config, "tokenizer", len(source), config.tokenizer.batch_size)
    step_fn = jax.jit(functools.partial(tokenizer_lib.train_step, graphdef, optimizer=optimizer), donate_argnums=0)
    key = stage_key(config, "tokenizer")

    def step(state, i):
        images = data.to_float(source.get_batch(local_slice(sampler.batch(i)))["image"])
        return step_fn(state, distributed.shard_batch(images, mesh), jax.random.fold_in(key, i))

    return loop.Task("tokenizer", state, step, config.tokenizer.steps, params_of=lambda s: s.params)


def load_tokenizer(config: ml_collections.ConfigDict, stage_dir: str) -> tokenizer_lib.SpectralTokenizer:
    graphdef, state, _ = init_tokenizer(config)
    state = restore_params(stage_dir, state)
    return nnx.merge(graphdef, state.params, state.stats)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _encode(graphdef, state, images, coarse):
    return nnx.merge(graphdef, state).encode(images, "coarse" if coarse else "all")


def encode_examples(config: ml_collections.ConfigDict, tokenizer: tokenizer_lib.SpectralTokenizer,
                    source: data.Source, batch_size: int = 250) -> dict[str, np.ndarray]:
    """The AR model's examples: every image's tokens under the frozen tokenizer (a per-example map:
    coarse scale only, or all scales for full_dp) and its condition (label or caption bytes)."""
    graphdef, state = nnx.split(tokenizer)
    coarse = builders.coarse_only(config)
    parts: dict[str, list[np.ndarray]] = {"tokens": [], "label": [], "caption_bytes": []}
    for start in range(0, len(source), batch_size):
        idx = np.arange(start, min(start + batch_size, len(source)))
        raw = source.get_batch(np.pad(idx, (0, batch_size - len(idx)), mode="edge"))
        tokens = _encode(graphdef, state, jnp.asarray(data.to_float(raw["image"])), coarse)
        parts["tokens"].append(np.asarray(tokens, np.int32)[: len(idx)])
        if config.data.condition == "label":
            parts["label"].append(np.asarray(raw["label"], np.int32)[: len(idx)])
        elif config.data.condition == "caption":
            captions = [str(c) for c in raw["caption"][: len(idx)]]
            parts["caption_bytes"].append(encode_captions(captions, config.transformer.max_text_len))
    return {k: np.concatenate(v) for k, v in parts.items() if v}


# -- AR model ----------------------------------------------------------------------------------------
def init_transformer(config: ml_collections.ConfigDict, *, finetune: bool = False) -> tuple[nnx.GraphDef, Any]:
    """The AR model as pretrained, or (`finetune`) as the DP stage trains it (with its LoRA adapters)."""
    tcfg = builders.transformer_config(config, builders.tokenizer_config(config), finetune=finetune)
    model = transformer_lib.ARTransformer(tcfg, rngs=nnx.Rngs(params=stage_key(config, "pretrain")))
    graphdef, params = nnx.split(model, nnx.Param)
    return graphdef, params


def init_pretrain(config: ml_collections.ConfigDict) -> tuple[nnx.GraphDef, steps.TrainState, optax.GradientTransformation]:
    graphdef, params = init_transformer(config)
    optimizer = optax.adamw(config.pretrain.learning_rate, weight_decay=1e-4)
    return graphdef, steps.TrainState(params, optimizer.init(params)), optimizer


def pretrain_task(config: ml_collections.ConfigDict, mesh: Mesh, tokenizer_dir: str) -> loop.Task:
    source = builders.load(config, "public")
    data.require_public(source, "AR pretraining")
    examples = encode_examples(config, load_tokenizer(config, tokenizer_dir), source)
    graphdef, state, optimizer = init_pretrain(config)
    if config.pretrain.init_from:
        state = restore_params(config.pretrain.init_from, state)
    state = distributed.replicate(state, mesh)

    def loss_fn(params, batch, rng):
        return transformer_lib.batch_loss(graphdef, params, batch, rng), {}

    step_fn = steps.public_step(loss_fn, optimizer, mesh)
    sampler = _shuffled(config, "pretrain", len(source), config.pretrain.batch_size)
    key = stage_key(config, "pretrain")

    def step(state, i):
        batch = {k: v[local_slice(sampler.batch(i))] for k, v in examples.items()}
        return step_fn(state, distributed.shard_batch(batch, mesh), jax.random.fold_in(key, i))

    return loop.Task("pretrain", state, step, config.pretrain.steps, params_of=lambda s: s.params)


# -- refiner -----------------------------------------------------------------------------------------
def init_refiner(config: ml_collections.ConfigDict) -> tuple[nnx.GraphDef, Any]:
    model = refiner_lib.Refiner(builders.refiner_config(config), rngs=nnx.Rngs(params=stage_key(config, "refiner")))
    return nnx.split(model, nnx.Param)


def refiner_task(config: ml_collections.ConfigDict, mesh: Mesh) -> loop.Task:
    source = builders.load(config, "public")
    data.require_public(source, "refiner training")
    graphdef, params = init_refiner(config)
    optimizer = refiner_lib.make_optimizer(config.refiner.learning_rate, max(config.refiner.steps, 1))
    state = steps.TrainState(params, optimizer.init(params))
    if config.refiner.init_from:
        state = restore_params(config.refiner.init_from, state)
    state = distributed.replicate(state, mesh)
    loss_fn: Callable = functools.partial(refiner_lib.refiner_loss, graphdef)
    step_fn = steps.public_step(loss_fn, optimizer, mesh)
    sampler = _shuffled(config, "refiner", len(source), config.refiner.batch_size)
    key = stage_key(config, "refiner")
    with_label = builders.refiner_config(config).num_classes is not None

    def step(state, i):
        raw = source.get_batch(local_slice(sampler.batch(i)))
        batch = {"image": raw["image"]}  # uint8; the refiner converts to [-1, 1]
        if with_label:
            batch["label"] = np.asarray(raw["label"], np.int32)
        return step_fn(state, distributed.shard_batch(batch, mesh), jax.random.fold_in(key, i))

    return loop.Task("refiner", state, step, config.refiner.steps, params_of=lambda s: s.params)
