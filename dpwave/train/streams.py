"""The public random streams of a run, all derived from `config.seed` and a stage's stream number.

* JAX randomness (initialization, dropout, the tokenizer's codebook, the refiner's noise): `stage_key(seed,
  stream)` = fold_in(key(config.seed), stream); a step's key is fold_in(stage key, step).
* A public stage's data order: `shuffled(...)`, a `data.ShuffleSampler` seeded with config.seed * 100 + stream
  (numpy's Philox through SeedSequence), a fresh permutation each epoch.

Both are one scheme, (config.seed, stream[, step]), in the two generators the stages use (JAX keys on device,
numpy's Philox for host-side index order). Stream numbers are each stage's `Stage.stream`; the DP stage has none:
its randomness (Poisson draws, noise, per-example keys) comes from the secret seed only (`dpwave.privacy.secret`),
never from config.seed. The evaluation's classifiers use fixed seeds of their own (`dpwave.evaluate`), so every
run is scored by the same ones; they are not run streams.
"""

from __future__ import annotations

import jax

from dpwave import data


def stage_key(seed: int, stream: int) -> jax.Array:
    """The key of a stage's random stream: fold_in(key(config.seed), stream)."""
    return jax.random.fold_in(jax.random.key(seed), stream)


def shuffled(seed: int, stream: int, size: int, batch_size: int, section: str) -> data.ShuffleSampler:
    """A public stage's data order: fixed-size batches of a fresh permutation each epoch, a function of (seed,
    stream, step)."""
    if batch_size % jax.device_count():
        raise ValueError(f"config.{section}.batch_size={batch_size} must be a multiple of the device count "
                         f"({jax.device_count()}) for data parallelism")
    return data.ShuffleSampler(size, batch_size, seed=seed * 100 + stream)
