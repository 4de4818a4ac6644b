"""The Gaussian mechanism of DP-SGD as Optax transforms, with the PRNG key in the state.

`noise_and_normalize` takes the SUM of clipped per-example gradients (from
`clipping.clipped_grad`), adds N(0, (sigma * C)^2) to every coordinate once and divides by the
EXPECTED batch size q * N, a public constant (never the realized batch size, which is private
under Poisson sampling).

The noise of step t is drawn from `fold_in(key, t)`: keys never repeat across steps and a
restored state continues the exact noise sequence. `noise_multiplier=0` is the non-private
reference: gradients are still clipped and normalized, no noise is drawn.
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any


class NoiseState(NamedTuple):
    """State of the noise transforms: raw uint32 key data (checkpoint friendly) and steps taken."""

    key: jax.Array
    count: jax.Array


def _check_number(name: str, value: Any, *, positive: bool) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        need = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be a finite Python number {need}, got {value!r}.")


def _key_parts(key: int | jax.Array | np.ndarray) -> tuple[jax.Array, Any]:
    """Raw key data and the PRNG implementation (None: JAX's default) of a seed or key."""
    if isinstance(key, np.ndarray):
        key = jnp.asarray(key)
    if isinstance(key, bool) or not isinstance(key, (int, jax.Array)):
        raise ValueError(f"key must be an int seed or a jax PRNG key, got {key!r}.")
    if isinstance(key, int):
        return jax.random.key_data(jax.random.key(key)), None
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape:
            raise ValueError(f"key must be a single PRNG key, got a batch of shape {key.shape}.")
        return jax.random.key_data(key), jax.random.key_impl(key)
    if key.dtype != jnp.uint32:
        raise ValueError(f"a raw key must be uint32 key data (jax.random.PRNGKey), got {key.dtype}.")
    return key, None


def _add_noise(
    sums: PyTree, state: NoiseState, std: float, expected_batch_size: float, impl: Any
) -> tuple[PyTree, NoiseState]:
    leaves, treedef = jax.tree.flatten(sums)
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.key, impl=impl), state.count)
    keys = jax.random.split(step_key, max(len(leaves), 1))
    out = []
    for g, k in zip(leaves, keys):
        g = g.astype(jnp.float32)
        if std > 0:
            g = g + jnp.float32(std) * jax.random.normal(k, g.shape, jnp.float32)
        out.append(g / jnp.float32(expected_batch_size))
    return treedef.unflatten(out), NoiseState(state.key, state.count + 1)


def _init(key: int | jax.Array, l2_clip: float, noise_multiplier: float, expected_batch_size: float) -> tuple[Any, Any]:
    _check_number("l2_clip", l2_clip, positive=True)
    _check_number("noise_multiplier", noise_multiplier, positive=False)
    _check_number("expected_batch_size", expected_batch_size, positive=True)
    raw, impl = _key_parts(key)

    def init_fn(params: PyTree) -> NoiseState:
        del params
        return NoiseState(key=jnp.asarray(raw), count=jnp.zeros((), jnp.int32))

    return init_fn, impl


def noise_and_normalize(
    *, l2_clip: float, noise_multiplier: float, expected_batch_size: float, key: int | jax.Array
) -> optax.GradientTransformation:
    """Summed clipped gradients -> (sum + N(0, (noise_multiplier * l2_clip)^2)) / expected_batch_size.

    Args:
      l2_clip: the clipping norm C the sum was clipped with (> 0).
      noise_multiplier: sigma >= 0; 0 is the explicit non-private reference (no noise).
      expected_batch_size: q * N (> 0), the public normalizer.
      key: int seed or PRNG key of the noise stream; use a key no other stream uses.
    """
    init_fn, impl = _init(key, l2_clip, noise_multiplier, expected_batch_size)
    std = float(noise_multiplier) * float(l2_clip)

    def update_fn(updates: PyTree, state: NoiseState, params: PyTree = None):
        del params
        return _add_noise(updates, state, std, expected_batch_size, impl)

    return optax.GradientTransformation(init_fn, update_fn)
