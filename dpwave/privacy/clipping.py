"""Sum of per-example gradients, each clipped to L2 norm <= C over the whole parameter tree.

`clipped_grad(loss_fn, l2_clip=C)` turns a per-example loss into
`fn(params, batch, mask, keys) -> (grad_sum, ClipAux)`, the DP-SGD sensitivity-bounded sum:
adding or removing one example changes `grad_sum` by at most C in L2 norm, provided each example's
key depends on nothing but that example and a fixed step key (`dpwave.privacy.keys.example_keys`). Noise and the
normalization by the expected batch size are a separate step (`dpwave.privacy.noise`).

Trainable subsets. With `trainable`, only the selected leaves are differentiated (no per-example
gradients of frozen leaves are ever computed) and `grad_sum` has the structure of
`partition(params, trainable)[0]`: the full tree with `None` at frozen leaves, which Optax
transforms accept as is. Merge updated trainable leaves back with
`combine(new_trainable, frozen)`.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dpwave.privacy import ghost
from dpwave.validation import check_number

PyTree = Any
LossFn = Callable[[PyTree, PyTree, jax.Array], jax.Array]
Trainable = PyTree | Callable[[tuple[str, ...]], bool] | None
ClippedGradFn = Callable[[PyTree, PyTree, jax.Array, jax.Array], tuple[PyTree, "ClipAux"]]


class ClipAux(NamedTuple):
    """Per-step diagnostics of `clipped_grad` (a pytree: safe to return from jit).

    Attributes:
      norms: (B,) float32 per-example gradient L2 norms before clipping (padding rows included).
      losses: (B,) per-example losses.
      num_nonfinite: int32 count of valid (mask=1) examples whose gradient held NaN/inf (or whose
        norm overflowed float32 or exceeded 2^126 C); their contribution was zeroed.
      clipped: (B,) bool, the norm exceeded the clip norm C (the example's gradient was scaled down).
    """

    norms: jax.Array
    losses: jax.Array
    num_nonfinite: jax.Array
    clipped: jax.Array


def _path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
    names = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                names.append(str(getattr(entry, attr)))
                break
        else:
            names.append(str(entry))
    return tuple(names)


def partition(params: PyTree, trainable: Trainable) -> tuple[PyTree, PyTree]:
    """Splits `params` into (trainable, frozen) trees of the same structure, `None` elsewhere.

    Args:
      params: parameter pytree (e.g. an `nnx.State`).
      trainable: `None` (everything trainable), a bool pytree matching `params`, or a predicate
        over key paths given as tuples of names, e.g. `lambda path: "head" in path`.
    """
    if trainable is None:
        return params, jax.tree.map(lambda _: None, params)
    if callable(trainable):
        flags = jax.tree_util.tree_map_with_path(lambda path, _: bool(trainable(_path_names(path))), params)
    else:
        try:
            flags = jax.tree.map(lambda _, t: t, params, trainable)
        except ValueError as e:
            raise ValueError(
                "`trainable` must be None, a predicate over key paths, or a bool pytree with the "
                f"structure of params; got a mismatching tree: {e}"
            ) from e
    for flag in jax.tree.leaves(flags):
        if not isinstance(flag, (bool, np.bool_)):
            raise ValueError(f"`trainable` leaves must be Python bools, got {flag!r}.")
    if not any(bool(f) for f in jax.tree.leaves(flags)):
        raise ValueError("`trainable` selects no parameter: at least one leaf must be True.")
    train = jax.tree.map(lambda p, t: p if t else None, params, flags)
    frozen = jax.tree.map(lambda p, t: None if t else p, params, flags)
    return train, frozen


def combine(trainable: PyTree, frozen: PyTree) -> PyTree:
    """Inverse of `partition`: takes each leaf from whichever tree holds it."""
    return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None)


def clip_factors(norms: jax.Array, mask: jax.Array, l2_clip: float) -> tuple[jax.Array, jax.Array]:
    """(weights, usable): weight_i = [mask_i != 0] * min(1, C / norm_i); 0 if norm_i is not usable.

    A norm is usable if it is finite and C / norm_i is a normal float32 (norm_i <= 2^126 C): a subnormal
    factor rounds with a large relative error, up to 2x, so that example is dropped instead. The mask is
    binarized, so no mask value can scale a contribution beyond C.
    """
    scale = jnp.minimum(jnp.float32(1.0), jnp.float32(l2_clip) / norms.astype(jnp.float32))
    usable = scale >= jnp.finfo(jnp.float32).tiny  # False for NaN and inf norms (factor NaN and 0)
    valid = (mask != 0).astype(jnp.float32)
    weights = jnp.where(usable, valid * scale, jnp.float32(0.0))
    return weights, usable


def per_example_norms(per_example_grads: PyTree) -> jax.Array:
    """Float32 L2 norm over the whole tree of each row of per-example gradients (leading axis B).

    Scaled by a power of two per row (`ghost.l2_norms`): gradient entries below 1e-19, whose squares
    underflow, or above 1e19, whose squares overflow, still get their norm.
    """
    leaves = jax.tree.leaves(per_example_grads)
    if not leaves:
        raise ValueError("per-example gradients are an empty pytree: nothing to clip.")
    return ghost.l2_norms(leaves)


def weighted_sum(per_example_grads: PyTree, weights: jax.Array) -> PyTree:
    """sum_i weights_i * g_i in float32; rows with weight 0 contribute exactly 0 (even NaN rows)."""

    def reduce(g):
        w = weights.reshape((-1,) + (1,) * (g.ndim - 1))
        return jnp.sum(jnp.where(w != 0, g.astype(jnp.float32) * w, jnp.float32(0.0)), axis=0)

    return jax.tree.map(reduce, per_example_grads)


def _validate(l2_clip: float, microbatch_size: int | None) -> None:
    check_number("l2_clip", l2_clip, positive=True)
    if microbatch_size is not None and (
        isinstance(microbatch_size, bool) or not isinstance(microbatch_size, int) or microbatch_size < 1
    ):
        raise ValueError(f"microbatch_size must be None (whole batch at once) or an int >= 1, got {microbatch_size!r}.")


def _batch_size(batch: PyTree, mask: jax.Array) -> int:
    if mask.ndim != 1:
        raise ValueError(f"mask must have shape (batch,), got shape {mask.shape}.")
    size = mask.shape[0]
    for leaf in jax.tree.leaves(batch):
        if jnp.ndim(leaf) == 0 or leaf.shape[0] != size:
            raise ValueError(
                f"every batch leaf needs leading axis {size} (the mask length); got a leaf of shape {jnp.shape(leaf)}."
            )
    return size


def clipped_grad(
    loss_fn: LossFn,
    *,
    l2_clip: float,
    microbatch_size: int | None = None,
    trainable: Trainable = None,
    use_ghost_norms: bool = False,
) -> ClippedGradFn:
    """Builds fn(params, batch, mask, keys) -> (grad_sum, ClipAux), the sum of clipped grads.

    Args:
      loss_fn: `loss_fn(params, example, rng) -> scalar` for ONE example (no batch axis).
      l2_clip: clipping norm C > 0, applied to each example's gradient over the whole
        (trainable) tree.
      microbatch_size: examples processed at once; chunks run sequentially with `lax.scan`, so
        at most `microbatch_size` per-example gradients live in memory. None: the whole batch.
        A batch that is not a multiple is padded internally with masked rows.
      trainable: see `partition`; grad_sum then holds only the trainable leaves.
      use_ghost_norms: compute per-example norms and the clipped sum without materializing
        per-example gradients of weights that enter only `dot_general` ops (dense layers, attention
        projections), convolutions (as kernels) or row lookups (embedding tables): certified, see
        `dpwave.privacy.ghost`.
        Other leaves use per-example gradients.

    The returned fn takes `batch` (pytree, leading axis B), `mask` ((B,), nonzero for real
    examples, 0 for padding: a padding row contributes exactly zero because the binarized mask
    multiplies its clip factor) and `keys` ((B,) PRNG keys, example i's loss gets `keys[i]`; derive
    them with `dpwave.privacy.keys.example_keys`, never from the slot index). NaN/inf per-example
    gradients are zeroed and counted in `ClipAux.num_nonfinite`.
    """
    _validate(l2_clip, microbatch_size)

    def chunk(train, frozen, examples, weights_mask, keys):
        def example_loss(p, example, key):
            return loss_fn(combine(p, frozen), example, key)

        dense_sum = None
        if use_ghost_norms:
            res = ghost.ghost_norms(example_loss, train, examples, keys)
            losses, grads, dense_sum = res.losses, res.fallback_grads, res.dense_sum
            norms = ghost.l2_norms([*jax.tree.leaves(grads), res.dense_norms])
        else:
            losses, grads = jax.vmap(jax.value_and_grad(example_loss), in_axes=(None, 0, 0))(train, examples, keys)
            norms = per_example_norms(grads)
        weights, usable = clip_factors(norms, weights_mask, l2_clip)
        num_nonfinite = jnp.sum((weights_mask != 0) & ~usable).astype(jnp.int32)
        grad_sum = weighted_sum(grads, weights)
        if dense_sum is not None:
            grad_sum = combine(grad_sum, dense_sum(weights))
        return grad_sum, norms, losses, num_nonfinite

    def fn(params: PyTree, batch: PyTree, mask: jax.Array, keys: jax.Array) -> tuple[PyTree, ClipAux]:
        mask = jnp.asarray(mask)
        size = _batch_size(batch, mask)
        if keys.shape != (size,) or not jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key):
            raise ValueError(f"keys must be ({size},) PRNG keys, one per example; got {keys.dtype}{keys.shape}.")
        train, frozen = partition(params, trainable)
        if microbatch_size is None or microbatch_size >= size:
            grad_sum, norms, losses, nnf = chunk(train, frozen, batch, mask, keys)
            return grad_sum, ClipAux(norms, losses, nnf, norms > l2_clip)
        chunks = -(-size // microbatch_size)
        pad = chunks * microbatch_size - size

        def split(x, fill=None):
            if pad:
                rows = jnp.repeat(x[:1], pad, axis=0) if fill is None else jnp.full((pad,), fill, x.dtype)
                x = jnp.concatenate([x, rows])
            return x.reshape((chunks, microbatch_size) + x.shape[1:])

        xs = jax.tree.map(split, (batch, keys))
        masks = split(mask, fill=0)

        def body(carry, inputs):
            (examples, ks), m = inputs
            s, norms, losses, nnf = chunk(train, frozen, examples, m, ks)
            acc, count = carry
            return (jax.tree.map(jnp.add, acc, s), count + nnf), (norms, losses)

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), train)
        (grad_sum, nnf), (norms, losses) = jax.lax.scan(body, (zeros, jnp.int32(0)), (xs, masks))
        norms = norms.reshape(-1)[:size]
        return grad_sum, ClipAux(norms, losses.reshape(-1)[:size], nnf, norms > l2_clip)

    return fn
