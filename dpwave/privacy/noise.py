"""The Gaussian mechanism of DP-SGD as Optax transforms, with the PRNG key in the state.

`noise_and_normalize` takes the SUM of clipped per-example gradients (from
`clipping.clipped_grad`), adds N(0, (sigma * C)^2) to every coordinate once and divides by the
EXPECTED batch size q * N, a public constant (never the realized batch size, which is private
under Poisson sampling).

The noise of step t is drawn from `fold_in(key, t)`: keys never repeat across steps and a
restored state continues the exact noise sequence. With a `mask_key` (never stored in the state), the noise of
step t comes from XLA's threefry bit generator (`lax.rng_bit_generator`, RNG_THREE_FRY) keyed by
`fold_in(key, t)` with its counter starting at `fold_in(mask_key, t)`: a 128-bit secret state, so recovering the
noise takes a search over both keys (`dpwave.privacy.secret`), a leaked state alone does not reveal it, and it
draws about 3x faster on CPU than `jax.random.normal`. `noise_multiplier=0` is the non-private reference:
gradients are still clipped and normalized, no noise is drawn.
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpwave.validation import check_number

PyTree = Any


class NoiseState(NamedTuple):
    """State of the noise transforms: raw uint32 key data (checkpoint friendly) and steps taken."""

    key: jax.Array
    count: jax.Array


def _key_parts(key: int | jax.Array | np.ndarray) -> tuple[jax.Array, Any]:
    """Raw key data and the PRNG implementation (None: JAX's default) of a seed or key."""
    if isinstance(key, np.ndarray):
        key = jnp.asarray(key)
    if isinstance(key, bool) or not isinstance(key, (int, jax.Array)):
        raise ValueError(f"key must be an int seed or a jax PRNG key, got {key!r}.")
    if isinstance(key, int):
        if not 0 <= key < 2**32:
            raise ValueError(f"an int key must lie in [0, 2**32): jax.random.key keeps only its low 32 bits; derive a "
                             f"key from a secret instead (dpwave.privacy.DpSecret.noise_keys), got {key!r}.")
        return jax.random.key_data(jax.random.key(key)), None
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape:
            raise ValueError(f"key must be a single PRNG key, got a batch of shape {key.shape}.")
        return jax.random.key_data(key), jax.random.key_impl(key)
    if key.dtype != jnp.uint32:
        raise ValueError(f"a raw key must be uint32 key data (jax.random.PRNGKey), got {key.dtype}.")
    return key, None


def normal_from_bits(bits: jax.Array) -> jax.Array:
    """Standard normal float32 samples from uint32 bits, as `jax.random.normal` maps its bits: the top 23 bits make
    a uniform in (-1, 1), and sqrt(2) erfinv maps it to N(0, 1)."""
    floats = jax.lax.bitcast_convert_type((bits >> 9) | jnp.uint32(0x3F800000), jnp.float32) - 1.0
    low = np.nextafter(np.float32(-1.0), np.float32(0.0))
    uniform = jnp.maximum(low, floats * (1.0 - low) + low)
    return jnp.float32(np.sqrt(2.0)) * jax.scipy.special.erfinv(uniform)


def _gaussian(key: jax.Array, mask_key: jax.Array | None, shape: tuple[int, ...]) -> jax.Array:
    """N(0, 1) float32 draws of `shape`: `jax.random.normal(key)` without a mask key; with one, from XLA's threefry
    bit generator whose 128-bit state is (key, counter) = (`key`'s 64 bits, `mask_key`'s 64 bits)."""
    if mask_key is None:
        return jax.random.normal(key, shape, jnp.float32)
    state = jnp.concatenate([jax.random.key_data(key), jax.random.key_data(mask_key)])
    _, bits = jax.lax.rng_bit_generator(state, (math.prod(shape),), jnp.uint32,
                                        algorithm=jax.lax.RandomAlgorithm.RNG_THREE_FRY)
    return normal_from_bits(bits).reshape(shape)


def _leaf_keys(raw: jax.Array, impl: Any, count: jax.Array, n: int) -> jax.Array:
    return jax.random.split(jax.random.fold_in(jax.random.wrap_key_data(raw, impl=impl), count), n)


def _add_noise(
    sums: PyTree, state: NoiseState, std: float, expected_batch_size: float, impl: Any,
    mask: tuple[jax.Array, Any] | None,
) -> tuple[PyTree, NoiseState]:
    leaves, treedef = jax.tree.flatten(sums)
    n = max(len(leaves), 1)
    keys = _leaf_keys(state.key, impl, state.count, n)
    mask_keys = [None] * n if mask is None else _leaf_keys(*mask, state.count, n)
    out = []
    for g, k, m in zip(leaves, keys, mask_keys):
        g = g.astype(jnp.float32)
        if std > 0:
            g = g + jnp.float32(std) * _gaussian(k, m, g.shape)
        out.append(g / jnp.float32(expected_batch_size))
    return treedef.unflatten(out), NoiseState(state.key, state.count + 1)


def _init(key: int | jax.Array, l2_clip: float, noise_multiplier: float, expected_batch_size: float) -> tuple[Any, Any]:
    check_number("l2_clip", l2_clip, positive=True)
    check_number("noise_multiplier", noise_multiplier, positive=False)
    check_number("expected_batch_size", expected_batch_size, positive=True)
    raw, impl = _key_parts(key)

    def init_fn(params: PyTree) -> NoiseState:  # a new key buffer each time: the step donates (consumes) it
        del params
        return NoiseState(key=jnp.array(raw), count=jnp.zeros((), jnp.int32))

    return init_fn, impl


def noise_and_normalize(
    *, l2_clip: float, noise_multiplier: float, expected_batch_size: float, key: int | jax.Array,
    mask_key: jax.Array | None = None,
) -> optax.GradientTransformation:
    """Summed clipped gradients -> (sum + N(0, (noise_multiplier * l2_clip)^2)) / expected_batch_size.

    Args:
      l2_clip: the clipping norm C the sum was clipped with (> 0).
      noise_multiplier: sigma >= 0; 0 is the explicit non-private reference (no noise).
      expected_batch_size: q * N (> 0), the public normalizer.
      key: int seed in [0, 2^32) or PRNG key of the noise stream (kept in the state); use a key no other
        stream uses.
      mask_key: optional second PRNG key, never stored in the state: the noise then comes from a generator whose
        128-bit state holds both keys (the DP stage passes `DpSecret.noise_keys()`).
    """
    init_fn, impl = _init(key, l2_clip, noise_multiplier, expected_batch_size)
    mask = None if mask_key is None else _key_parts(mask_key)
    std = float(noise_multiplier) * float(l2_clip)

    def update_fn(updates: PyTree, state: NoiseState, params: PyTree = None):
        del params
        return _add_noise(updates, state, std, expected_batch_size, impl, mask)

    return optax.GradientTransformation(init_fn, update_fn)
