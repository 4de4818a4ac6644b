"""Test-side trainers: a tokenizer or a refiner from a `dpwave.data.Source` and a model config, in memory.

The pipeline trains through its stage tasks (dpwave/train/public_stages.py) and `loop.run`; these short
loops are the tests' way to get a trained model without a run config. They use the models' own pieces (the
tokenizer's `train_step`, the refiner's `refiner_loss` and `make_optimizer`) and are deterministic from
``seed``; the quality thresholds of tests/models were measured with them.
"""
from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dpwave.data import ShuffleSampler, require_public, to_float
from dpwave.models import refiner as rf
from dpwave.models import tokenizer as tok

CALIBRATION_IMAGES = 1024


def _source_images(source: Any, indices: np.ndarray) -> jax.Array:
    return jnp.asarray(to_float(source.get_batch(indices)["image"]))


def train_tokenizer(source: Any, config: tok.TokenizerConfig, *, steps: int, batch_size: int, seed: int,
                    learning_rate: float) -> tok.SpectralTokenizer:
    """A tokenizer trained on a public source (calibrated on up to 1,024 of its images first)."""
    require_public(source, "tokenizer training")
    sampler = ShuffleSampler(len(source), batch_size, seed)
    optimizer = tok.make_optimizer(learning_rate, steps)
    key = jax.random.key(seed)
    model = tok.SpectralTokenizer(config, rngs=nnx.Rngs(params=jax.random.fold_in(key, 0)))
    calibration = np.random.default_rng(seed).permutation(len(source))[:CALIBRATION_IMAGES]
    model.calibrate(_source_images(source, np.sort(calibration)))
    graphdef, state = tok.init_train_state(model, optimizer)
    step_fn = jax.jit(functools.partial(tok.train_step, optimizer=optimizer), static_argnums=0, donate_argnums=1)
    restart_key = jax.random.fold_in(key, 1)
    for step in range(steps):
        state, _ = step_fn(graphdef, state, _source_images(source, sampler.batch(step)),
                           jax.random.fold_in(restart_key, step))
    return nnx.merge(graphdef, state.params, state.stats)


@functools.partial(jax.jit, static_argnames=("graphdef", "tx"), donate_argnames=("params", "opt_state"))
def _refiner_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, params: nnx.State,
                  opt_state: optax.OptState, batch: Mapping[str, jax.Array],
                  rng: jax.Array) -> tuple[nnx.State, optax.OptState, jax.Array]:
    (loss, _), grads = jax.value_and_grad(rf.refiner_loss, argnums=1, has_aux=True)(graphdef, params, batch, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def train_refiner(source: Any, config: rf.RefinerConfig, *, steps: int, batch_size: int, seed: int,
                  learning_rate: float) -> tuple[rf.Refiner, list[float]]:
    """A refiner trained on a public source; returns it and the loss of every step."""
    require_public(source, "refiner training")
    init_key, key = jax.random.split(jax.random.key(seed))
    graphdef, params = nnx.split(rf.Refiner(config, rngs=nnx.Rngs(init_key)), nnx.Param)
    tx = rf.make_optimizer(learning_rate, steps)
    opt_state = tx.init(params)
    sampler = ShuffleSampler(len(source), batch_size, seed)
    losses = []
    for step in range(steps):
        raw = source.get_batch(sampler.batch(step))
        batch = {"image": raw["image"]}
        if config.num_classes is not None:
            batch["label"] = np.asarray(raw["label"], np.int32)
        params, opt_state, loss = _refiner_step(graphdef, tx, params, opt_state, batch, jax.random.fold_in(key, step))
        losses.append(float(loss))
    return nnx.merge(graphdef, params), losses
