"""Per-example PRNG keys for the DP step, derived from the secret step key and the example itself.

A loss with randomness (dropout, condition dropout) gives each example its own key. If that key
depended on the example's slot in the batch, adding one example to the data set would shift the
slots of the examples sampled after it, change their keys, and so change their clipped gradients:
the sum would move by more than C (measured up to 1.93 C with condition dropout). Here the key of an
example is a keyed hash of its own content under the step key, so for every fixed step key, adding or
removing one example changes no other example's key, and the clipped sum moves by at most C. Two
identical examples share a key, which is harmless: each still contributes its own clipped gradient.

The step key must be secret (derived from the DP secret seed): whoever knows it knows every
example's randomness, although the guarantee above does not depend on it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def _words(leaf: jax.Array) -> jax.Array:
    """The leaf's values as a flat uint32 vector (floats by their bit patterns)."""
    leaf = jnp.asarray(leaf)
    if jnp.issubdtype(leaf.dtype, jnp.floating):
        bits = {2: jnp.uint16, 4: jnp.uint32}.get(leaf.dtype.itemsize)
        if bits is None:
            raise TypeError(f"unsupported float dtype {leaf.dtype} in a DP example")
        leaf = jax.lax.bitcast_convert_type(leaf, bits)
    return leaf.reshape(-1).astype(jnp.uint32)


def content_key(step_key: jax.Array, example: PyTree) -> jax.Array:
    """A key for ONE example (no batch axis): a keyed hash of every leaf's values and positions.

    Each value is folded into the step key together with its leaf and position, and the resulting key
    data are combined by XOR (all in parallel; no slot or batch information enters).
    """
    leaves = jax.tree.leaves(example)
    if not leaves:
        raise ValueError("a DP example with no leaves has no content to derive its key from")
    digest = None
    for leaf_index, leaf in enumerate(leaves):
        words = _words(leaf)
        leaf_key = jax.random.fold_in(step_key, leaf_index)
        positions = jnp.arange(words.shape[0], dtype=jnp.uint32)
        data = jax.vmap(lambda i, w: jax.random.key_data(jax.random.fold_in(jax.random.fold_in(leaf_key, i), w)))(
            positions, words
        )
        part = jax.lax.reduce(data, jnp.zeros((), data.dtype), jax.lax.bitwise_xor, (0,))
        digest = part if digest is None else digest ^ part
    return jax.random.wrap_key_data(digest, impl=jax.random.key_impl(step_key))


def example_keys(step_key: jax.Array, batch: PyTree) -> jax.Array:
    """(B,) per-example keys `content_key(step_key, example_i)` for a batch with leading axis B."""
    return jax.vmap(content_key, in_axes=(None, 0))(step_key, batch)
