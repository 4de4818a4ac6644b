"""The sensitivity the accountant assumes, through the real jitted DP step and the real AR transformer.

With condition dropout on, adding one example to the Poisson batch (first, in the middle or last of the
sorted batch) must move the clipped sum by at most C on both clipping paths, with float32 and with bfloat16
activations. With slot-derived per-example keys this failed (up to 1.93 C): the added example shifted the
other examples' slots, so their keys and condition-dropout draws changed. The bfloat16 cases passed on
their first run: both paths bound and sum the same float32 values (ghost: X and D cast exactly).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpwave import privacy
from dpwave.models import transformer as transformer_lib
from dpwave.train import ar_examples, distributed, settings, steps
from experiments.configs import mnist

pytestmark = pytest.mark.integration

CLIP, OTHERS, BUCKET = 1.0, 31, 40


@functools.cache
def _setup(ghost: bool, dtype: str):
    """The demo's transformer (condition dropout 0.1, `dtype` activations), randomly initialized, and its jitted DP
    step."""
    model = dataclasses.replace(settings.read(mnist.get_config("demo")).transformer, dtype=dtype)
    assert model.cond_dropout > 0
    graphdef, params = ar_examples.init_transformer(model, jax.random.key(0))
    # SGD with learning rate 1, no noise, expected batch 1: params_after = params - clipped sum.
    optimizer = privacy.dp_optimizer(optax.sgd(1.0), l2_clip=CLIP, noise_multiplier=0.0, expected_batch_size=1.0, key=0)
    clipped_sum = privacy.clipped_grad(lambda p, ex, key: transformer_lib.per_example_loss(graphdef, p, ex, key),
                                       l2_clip=CLIP, microbatch_size=8, use_ghost_norms=ghost)
    step = steps.dp_step(clipped_sum, optimizer, distributed.make_data_mesh())
    return step, optimizer, params, model


def _examples(n: int, seq_len: int, vocab: int) -> dict:
    rng = np.random.default_rng(0)
    return {"tokens": rng.integers(0, vocab, (n, seq_len)).astype(np.int32),
            "label": rng.integers(0, 10, n).astype(np.int32)}


def _clipped_sum(ghost: bool, dtype: str, batch: dict, rng: jax.Array) -> np.ndarray:
    step, optimizer, params, _ = _setup(ghost, dtype)
    size = len(batch["label"])
    padded = {k: np.concatenate([v, np.repeat(v[:1], BUCKET - size, axis=0)]) for k, v in batch.items()}
    mask = (np.arange(BUCKET) < size).astype(np.float32)
    state = steps.TrainState(jax.tree.map(jnp.copy, params), optimizer.init(params))
    new, _ = step(state, padded, mask, rng, 0)
    delta = jax.tree.map(lambda a, b: a - b, params, new.params)
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(delta)])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("ghost", [False, True], ids=["vmap", "ghost"])
def test_adding_one_example_moves_the_clipped_sum_by_at_most_c(ghost, dtype):
    model = _setup(ghost, dtype)[3]
    data = _examples(OTHERS + 1, model.seq_len, model.vocab_size)
    extra, others = {k: v[:1] for k, v in data.items()}, {k: v[1:] for k, v in data.items()}
    for s in range(3):
        rng = jax.random.key(100 + s)
        without = _clipped_sum(ghost, dtype, others, rng)
        for where in (0, OTHERS // 2, OTHERS):
            with_extra = {k: np.concatenate([others[k][:where], extra[k], others[k][where:]]) for k in data}
            moved = float(np.linalg.norm(_clipped_sum(ghost, dtype, with_extra, rng) - without))
            assert moved <= CLIP * (1 + 1e-5), (where, s, moved)
