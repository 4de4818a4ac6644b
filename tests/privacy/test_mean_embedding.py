"""DP-MERF's release: unit-norm contributions, the sensitivity bound for any input, the accounting of one release,
the noise, and the decoding of the release into the generator's targets."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize, stats

from dpwave import privacy
from dpwave.privacy import mean_embedding
from dpwave.privacy.ledger import DpParams, PrivacyLedger

pytestmark = pytest.mark.unit

DIM, FEATURES, CLASSES, WEIGHT = 48, 256, 4, 0.5


def _features(length_scale=3.0, seed=0):
    return mean_embedding.draw_features(jax.random.key(seed), DIM, FEATURES, length_scale)


def _sum(feats, x, labels):
    vectors = mean_embedding.example_vectors(feats, jnp.asarray(x), jnp.asarray(labels), CLASSES, WEIGHT)
    return mean_embedding.clipped_sum(vectors, jnp.ones(len(labels), jnp.float32))


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in jax.tree.leaves(tree)])


def test_every_contribution_has_unit_norm():
    x = np.random.default_rng(0).normal(size=(64, DIM)).astype(np.float32)
    vectors = mean_embedding.example_vectors(_features(), jnp.asarray(x), jnp.arange(64) % CLASSES, CLASSES, WEIGHT)
    norms = np.sqrt(sum(np.sum(np.asarray(v, np.float64).reshape(64, -1) ** 2, axis=1)
                        for v in jax.tree.leaves(vectors)))
    np.testing.assert_allclose(norms, 1.0, atol=1e-5)


@pytest.mark.parametrize("extra", ["gaussian", "huge", "tiny_scale", "nan", "inf"])
def test_one_example_moves_the_sum_by_at_most_one(extra):
    """Add-or-remove-one: whatever the added example holds (pixels far out of range, NaN, inf, a length scale
    that makes the features overflow), the clipped sum moves by at most 1 (the sensitivity the accountant uses)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, DIM)).astype(np.float32)
    labels = np.arange(40) % CLASSES
    feats = _features(1e-30 if extra == "tiny_scale" else 3.0)
    row = {"gaussian": rng.normal(size=DIM), "huge": np.full(DIM, 3e38), "tiny_scale": rng.normal(size=DIM),
           "nan": np.full(DIM, np.nan), "inf": np.full(DIM, np.inf)}[extra].astype(np.float32)
    base = _flat(_sum(feats, x, labels))
    more = _flat(_sum(feats, np.concatenate([x, row[None]]), np.append(labels, 3)))
    assert np.all(np.isfinite(more))
    assert np.linalg.norm(more - base) <= 1.0 + 1e-6


def test_one_release_is_accounted_as_the_gaussian_mechanism():
    """The release is one DP-SGD step of q = 1 and C = 1: its epsilon is the plain Gaussian mechanism's (sigma on
    a sum of L2 sensitivity 1), here from the exact analytic curve (Balle & Wang 2018), not from dp-accounting."""
    sigma, delta = 1.7, 1e-5

    def delta_of(eps):
        return stats.norm.cdf(-eps * sigma + 0.5 / sigma) - math.exp(eps) * stats.norm.cdf(-eps * sigma - 0.5 / sigma)

    exact = optimize.brentq(lambda e: delta_of(e) - delta, 1e-6, 50.0, xtol=1e-12)
    ledger = PrivacyLedger(DpParams(noise_multiplier=sigma, sampling_prob=1.0, delta=delta, dataset_size=2000))
    ledger.record_steps(1)
    assert exact <= ledger.epsilon() <= exact * 1.01  # the ledger's PLD discretization is pessimistic


def test_the_statement_describes_the_release():
    ledger = PrivacyLedger(DpParams(noise_multiplier=1.0, sampling_prob=1.0, delta=1e-5, dataset_size=100))
    ledger.record_steps(1)
    text = privacy.privacy_statement(ledger, release="mean_embedding")
    assert "1 release(s) of a mean embedding (DP-MERF)" in text
    assert "every example of the private set enters the one release" in text
    assert "DP-SGD" not in text and "gradients" not in text
    with pytest.raises(ValueError, match="release="):
        privacy.privacy_report(ledger, release="merf")


def test_release_adds_sigma_over_n_gaussian_noise_once():
    sigma, n = 2.0, 50
    mechanism = privacy.DpSgdMechanism(1.0, DpParams(noise_multiplier=sigma, sampling_prob=1.0, delta=1e-5,
                                                     dataset_size=n))
    zeros = {"counts": jnp.zeros(CLASSES), "embedding": jnp.zeros((CLASSES, 20_000))}
    noise = _flat(mean_embedding.release(zeros, mechanism.noise(jax.random.key(3))))
    assert stats.kstest(noise / (sigma / n), "norm").pvalue > 1e-6
    again = _flat(mean_embedding.release(zeros, mechanism.noise(jax.random.key(3))))
    other = _flat(mean_embedding.release(zeros, mechanism.noise(jax.random.key(4))))
    np.testing.assert_array_equal(noise, again)  # a function of the key
    assert not np.array_equal(noise, other)


@pytest.mark.slow  # utility of the release's decoding, not its guarantee; about 30 s
def test_class_targets_decode_a_noiseless_release():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(90, DIM)).astype(np.float32)
    labels = np.array([0] * 50 + [1] * 30 + [2] * 10)
    feats = _features()
    released = jax.tree.map(lambda v: v / len(x), _sum(feats, x, labels))
    means, proportions = mean_embedding.class_targets(released, WEIGHT, len(x))
    # The empty class is clamped to one example's share before normalizing.
    np.testing.assert_allclose(proportions, np.array([50, 30, 10, 1]) / 91, rtol=1e-5)
    phi = np.asarray(feats(jnp.asarray(x)))
    for k in range(3):
        np.testing.assert_allclose(means[k], phi[labels == k].mean(0), atol=1e-5)
        loss = mean_embedding.embedding_loss(feats, jnp.asarray(x[labels == k]), jnp.full(int(np.sum(labels == k)), k),
                                             means, jnp.eye(CLASSES)[k])
        assert float(loss) < 1e-8


def test_median_length_scale_is_the_median_distance_and_refuses_no_spread():
    x = np.array([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])
    assert mean_embedding.median_length_scale(x) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="no spread"):
        mean_embedding.median_length_scale(np.ones((5, 3)))


def test_features_refuse_odd_counts_and_bad_scales():
    with pytest.raises(ValueError, match="even"):
        mean_embedding.draw_features(jax.random.key(0), 4, 7, 1.0)
    with pytest.raises(ValueError, match="length_scale"):
        mean_embedding.draw_features(jax.random.key(0), 4, 8, math.inf)
