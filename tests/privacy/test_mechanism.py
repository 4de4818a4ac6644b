"""`privacy.DpSgdMechanism`: the one object the DP step, the ledger and the statement read their numbers from."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpwave import privacy
from dpwave.privacy import DpParams

pytestmark = pytest.mark.unit

N, Q, SIGMA, CLIP = 1000, 0.064, 1.5, 0.5


def _mechanism(**params) -> privacy.DpSgdMechanism:
    return privacy.DpSgdMechanism(CLIP, DpParams(**{"noise_multiplier": SIGMA, "sampling_prob": Q, "delta": 1e-5,
                                                    "dataset_size": N, "target_epsilon": 8.0, **params}))


def test_the_optimizer_adds_sigma_c_noise_once_and_divides_by_the_expected_batch():
    mechanism = _mechanism()
    assert mechanism.selection.expected_batch_size == pytest.approx(Q * N)
    optimizer = mechanism.optimizer(optax.sgd(1.0), jax.random.key(0))
    zeros = {"w": jnp.zeros(200_000)}
    updates, state = optimizer.update(zeros, optimizer.init(zeros), zeros)
    noise = -np.asarray(updates["w"]) * Q * N  # sgd(1) negates; times qN: the noise added to the sum
    assert abs(noise.std() - SIGMA * CLIP) < 0.01 * SIGMA * CLIP and abs(noise.mean()) < 0.01
    again, _ = optimizer.update(zeros, state, zeros)
    assert not np.array_equal(np.asarray(again["w"]), np.asarray(updates["w"]))  # a fresh draw each step
    signal = {"w": jnp.full(3, 6.4)}
    quiet = _mechanism(noise_multiplier=0.0).optimizer(optax.sgd(1.0), jax.random.key(0))
    np.testing.assert_allclose(quiet.update(signal, quiet.init(signal), signal)[0]["w"], -6.4 / (Q * N), rtol=1e-5)


def test_the_selection_ledger_and_guard_read_the_same_params():
    mechanism = _mechanism()
    sampler = mechanism.selection.sampler(seed=3)
    assert (sampler.num_examples, sampler.sampling_prob) == (N, Q)
    ledger = mechanism.ledger()
    assert ledger.steps == 0 and ledger.to_dict()["params"]["noise_multiplier"] == SIGMA
    assert mechanism.guard(ledger) is not None
    assert _mechanism(target_epsilon=None).guard(ledger) is None


@pytest.mark.parametrize("l2_clip", [0.0, -1.0, float("nan"), float("inf"), True, "1"])
def test_a_bad_clipping_norm_is_refused(l2_clip):
    with pytest.raises(ValueError, match="l2_clip"):
        privacy.DpSgdMechanism(l2_clip, _mechanism().params)


def test_a_mechanism_without_the_dataset_size_is_refused():
    with pytest.raises(ValueError, match="dataset_size"):
        privacy.DpSgdMechanism(CLIP, DpParams(noise_multiplier=SIGMA, sampling_prob=Q, delta=1e-5))
