"""Jitted, data-parallel training steps over the `data` mesh axis.

* Public stages: each device takes the gradient of the batch loss on its shard, gradients are
  averaged with `pmean` inside `jax.shard_map`, and the (replicated) optimizer update follows.
* The DP stage: each device sums the clipped per-example gradients of its shard of the padded Poisson
  batch, the sums are added with `psum`, and the optimizer chain (whose first transform adds the
  Gaussian noise once and divides by the expected batch size) runs replicated, with the same noise
  key on every device. Each example's randomness comes from a keyed hash of its own content under the
  (secret) step key (`dpwave.privacy.keys`), so it depends neither on the example's slot, nor on the
  other examples, nor on the number of devices.

Both steps donate their `state` argument: XLA writes the new state into the old one's buffers, so a step holds
one copy of the parameters and optimizer state, not two. The state passed in is consumed; the caller keeps the
returned one. A leaf whose host view is still held (an asynchronous checkpoint being written) is not donated:
JAX copies it instead, so a save in flight is never overwritten (tests/train/test_steps.py).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec as P

from dpwave.privacy import clipping, keys
from dpwave.train.distributed import DATA_AXIS

PyTree = Any
BatchLoss = Callable[[PyTree, PyTree, jax.Array], tuple[jax.Array, dict]]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
    """What a training stage checkpoints: parameters, optimizer state (incl. the DP noise key), and
    any non-trained model state (e.g. a VQ codebook's EMA statistics)."""

    params: PyTree
    opt_state: PyTree
    extra: PyTree = None


def public_step(loss_fn: BatchLoss, optimizer: optax.GradientTransformation, mesh: Mesh) -> Callable:
    """`step(state, batch, rng) -> (state, metrics)`: data-parallel non-private training.

    `loss_fn(params, batch_shard, rng) -> (loss, metrics)` is the mean loss over its shard. Each
    device folds its index into `rng`. Metrics are averaged over devices.
    """

    def local_grads(params, batch, rng):
        rng = jax.random.fold_in(rng, jax.lax.axis_index(DATA_AXIS))
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, rng)
        return jax.lax.pmean((grads, {"loss": loss, **metrics}), DATA_AXIS)

    grads_fn = jax.shard_map(local_grads, mesh=mesh, in_specs=(P(), P(DATA_AXIS), P()), out_specs=P())

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state: TrainState, batch: PyTree, rng: jax.Array) -> tuple[TrainState, dict]:
        grads, metrics = grads_fn(state.params, batch, rng)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return dataclasses.replace(state, params=params, opt_state=opt_state), metrics

    return step


def dp_step(clipped_sum: clipping.ClippedGradFn, optimizer: optax.GradientTransformation, mesh: Mesh, *,
            trainable: PyTree = None, ema_decay: float = 0.0) -> Callable:
    """`step(state, batch, mask, key, index) -> (state, metrics)`: one DP-SGD/DP-Adam step, one jitted call.

    In order: the step's key `fold_in(key, index)` (`key` must be secret: from the DP secret seed) and example i's
    key `keys.content_key(step key, batch[i])`; `clipped_sum(params, batch, mask, keys)`, the mechanism's sum of
    per-example gradients clipped to C (`DpSgdMechanism.clipped_sum`) on each device's shard, added across devices
    with `psum`; `optimizer`, the mechanism's (`DpSgdMechanism.optimizer`: the Gaussian noise once on the global
    sum, divided by the expected batch size, then the inner optimizer); with `ema_decay` > 0, `state.extra <- decay
    * state.extra + (1 - decay) * params` (post-processing). `batch` and `mask` are the padded Poisson batch
    (leading axis a multiple of the device count). With `trainable`, the optimizer state covers
    `clipping.partition(params, trainable)[0]`.

    The key is folded inside the jitted call: folding on the host would be a second, eager dispatch per step
    which, on CPU, waits for the running step, so the loop could not prepare the next batch meanwhile
    (bench_loop, tiny DP step: 25.8 ms with the eager fold_in, 19.4 ms folded inside).
    """

    def local_sum(params, batch, mask, rng):
        grad_sum, aux = clipped_sum(params, batch, mask, keys.example_keys(rng, batch))
        valid = mask.astype(jnp.float32)
        stats = {"loss_sum": jnp.sum(aux.losses * valid), "clipped_frac_sum": jnp.sum(aux.clipped * valid),
                 "num_nonfinite": aux.num_nonfinite, "batch_size": jnp.sum(valid)}
        return jax.lax.psum((grad_sum, stats), DATA_AXIS)

    # check_vma=False: the clipping scan starts from replicated zeros and accumulates per-device sums.
    sum_fn = jax.shard_map(local_sum, mesh=mesh, in_specs=(P(), P(DATA_AXIS), P(DATA_AXIS), P()), out_specs=P(),
                           check_vma=False)

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state: TrainState, batch: PyTree, mask: jax.Array, key: jax.Array,
             index: jax.Array) -> tuple[TrainState, dict]:
        batch = jax.lax.with_sharding_constraint(batch, jax.sharding.NamedSharding(mesh, P(DATA_AXIS)))
        grad_sum, stats = sum_fn(state.params, batch, mask, jax.random.fold_in(key, index))
        train, frozen = clipping.partition(state.params, trainable)
        updates, opt_state = optimizer.update(grad_sum, state.opt_state, train)
        params = clipping.combine(optax.apply_updates(train, updates), frozen)
        extra = state.extra
        if ema_decay:
            extra = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, state.extra, params)
        realized = jnp.maximum(stats["batch_size"], 1.0)
        metrics = {"loss": stats["loss_sum"] / realized, "clipped_frac": stats["clipped_frac_sum"] / realized,
                   "num_nonfinite": stats["num_nonfinite"], "batch_size": stats["batch_size"]}
        return TrainState(params, opt_state, extra), metrics

    return step
