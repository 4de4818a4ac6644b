"""Fixed-shape batched inference for NNX feature networks.

Every batch is padded to the same size, min(batch_size, N), so a jitted network compiles
once per (model structure, image shape, that size), and a row's output does not depend on
which other images share its batch.
"""
from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply(graphdef: nnx.GraphDef, method: str, state: nnx.State, x: jax.Array) -> jax.Array:
    return getattr(nnx.merge(graphdef, state), method)(x)


def apply_in_batches(model: nnx.Module, method: str, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Runs `model.<method>` on `x` in padded batches of `batch_size`; returns float32 numpy."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    graphdef, state = nnx.split(model)
    n = len(x)
    size = min(batch_size, n)
    outputs = []
    for start in range(0, n, size):
        chunk = x[start:start + size]
        pad = size - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
        out = np.asarray(_apply(graphdef, method, state, chunk), dtype=np.float32)
        outputs.append(out[:size - pad])
    return np.concatenate(outputs)
