"""One-run privacy audit: the statistics, and an end-to-end DP-SGD canary experiment.

The experiment trains logistic regression with DP-SGD written inline in plain JAX
(Poisson sampling, per-example clipping, one Gaussian noise draw per step,
normalisation by the expected batch size) -- and again through dpwave's own
``dp_optimizer(optax.sgd(lr))`` fed the clipped sum -- on synthetic data plus m "dirac"
canaries: canary i is the point c * e_(d+i) with label 1, in a feature dimension
no other example touches, each included with probability 1/2. Its score is the
trained weight w[d+i]. A correctly noised run must audit below its accounted
epsilon; a run with the noise off -- or ten times too small -- must audit above it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers.dp_models import clip_and_sum
from scipy import special, stats

from dpwave.privacy import accounting as acc
from dpwave.privacy import audit
from dpwave.privacy.optimizers import dp_optimizer

pytestmark = pytest.mark.unit

# ----------------------------------------------------------------------------- statistics


def test_p_value_is_the_binomial_tail_when_delta_is_zero():
    for eps in (0.0, 0.7, 3.0):
        p = special.expit(eps)
        assert audit.p_value(500, 120, 90, eps) == pytest.approx(stats.binom.sf(89, 120, p))


def test_p_value_delta_term_follows_the_paper():
    m, r, v, eps, delta = 1000, 60, 50, 1.0, 1e-4
    p = special.expit(eps)
    tail = stats.binom.sf(v - 1, r, p)
    alpha = max(sum(stats.binom.pmf(v - j, r, p) for j in range(1, i + 1)) / i
                for i in range(1, v + 1))
    assert audit.p_value(m, r, v, eps, delta) == pytest.approx(tail + 2 * m * delta * alpha)


def test_all_correct_bound_has_a_closed_form():
    # delta = 0 and v = r: p-value = expit(eps)^r, so the bound is logit(beta^(1/r)).
    for r, beta in [(10, 0.05), (200, 0.05), (1000, 0.01)]:
        bound = audit.epsilon_lower_bound(2 * r, r, r, beta=beta)
        assert bound == pytest.approx(special.logit(beta ** (1 / r)), rel=1e-7)


def test_bound_is_zero_at_chance_and_grows_with_hits():
    assert audit.epsilon_lower_bound(1000, 200, 100) == 0.0
    bounds = [audit.epsilon_lower_bound(1000, 200, v) for v in (120, 140, 160, 180, 200)]
    assert bounds == sorted(bounds) and bounds[0] > 0
    assert audit.epsilon_lower_bound(1000, 200, 180, delta=1e-3) < bounds[3]


def test_bound_holds_with_the_stated_confidence_on_randomized_response():
    # eps-randomized response is exactly eps-DP and makes the bound tight: over 400
    # independent audits at beta = 0.1 at most ~10% may exceed the true epsilon.
    # Threshold 70 = mean 40 + 4.7 sd: false alarm < 1e-5.
    eps_true, m, trials, beta = 1.0, 400, 400, 0.1
    rng = np.random.default_rng(0)
    bounds = []
    for _ in range(trials):
        included = rng.random(m) < 0.5
        keep = rng.random(m) < special.expit(eps_true)
        output = np.where(keep, included, ~included)
        scores = output + 0.01 * rng.random(m)
        result = audit.one_run_audit(scores, included, num_pos=m // 2, num_neg=m // 2,
                                     beta=beta)
        bounds.append(result.epsilon_lower_bound)
    bounds = np.array(bounds)
    assert (bounds > eps_true).sum() <= 70
    assert np.median(bounds) > 0.5 * eps_true  # and the bound is not vacuous


def test_one_run_audit_counts_hits():
    scores = np.array([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    included = np.array([True, False, True, False, True, False])
    result = audit.one_run_audit(scores, included, num_pos=2, num_neg=2)
    # in-guesses: 5 (T), 4 (F); out-guesses: 1 (T: wrong), 0 (F: right).
    assert (result.num_guesses, result.num_correct, result.num_canaries) == (4, 2, 6)
    assert result.epsilon_lower_bound == 0.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(scores=np.zeros(4), included=np.zeros(3, bool)), "same length"),
    (dict(scores=np.zeros(4), included=np.zeros(4, int)), "bool"),
    (dict(scores=np.array([0, 1, np.nan, 2.0])), "NaN"),
    (dict(num_pos=3, num_neg=2), "num_pos=3"),
    (dict(num_pos=0, num_neg=0), "num_pos=0"),
    (dict(beta=1.0), "beta=1.0"),
    (dict(delta=-1e-5), "delta=-1e-05"),
])
def test_one_run_audit_bad_inputs(kwargs, match):
    args = dict(scores=np.arange(4.0), included=np.array([True, False, True, False]),
                num_pos=1, num_neg=1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        audit.one_run_audit(**args)


def test_counts_validated():
    with pytest.raises(ValueError, match="num_correct"):
        audit.epsilon_lower_bound(10, 5, 6)
    with pytest.raises(ValueError, match="epsilon=-1"):
        audit.p_value(10, 5, 3, -1.0)


# ----------------------------------------------------------------------------- DP-SGD runner


def canary_dataset(seed, num_real, dim, num_canaries, magnitude=10.0):
    """Synthetic logistic data + dirac canaries, each included with probability 1/2."""
    rng = np.random.default_rng(seed)
    x_real = rng.normal(size=(num_real, dim)).astype(np.float32)
    teacher = rng.normal(size=dim)
    y_real = (x_real @ teacher + 0.5 * rng.normal(size=num_real) > 0).astype(np.float32)
    included = rng.random(num_canaries) < 0.5
    idx = np.flatnonzero(included)
    x_canary = np.zeros((idx.size, dim + num_canaries), np.float32)
    x_canary[np.arange(idx.size), dim + idx] = magnitude
    x = np.concatenate([np.pad(x_real, ((0, 0), (0, num_canaries))), x_canary])
    y = np.concatenate([y_real, np.ones(idx.size, np.float32)])
    return x, y, included


def _loss(w, xi, yi):
    z = xi @ w[:-1] + w[-1]
    return jax.nn.softplus(z) - yi * z


per_example_grads = jax.vmap(jax.grad(_loss), in_axes=(None, 0, 0))


@jax.jit
def _dp_sgd(x, y, steps_keys, sampling_prob, noise_multiplier, l2_clip, lr):
    """Reference DP-SGD, written inline: independent of dpwave's clipping and noise."""
    expected_batch = sampling_prob * x.shape[0]

    def step(w, k):
        k_sample, k_noise = jax.random.split(k)
        sampled = jax.random.bernoulli(k_sample, sampling_prob, (x.shape[0],))
        g = per_example_grads(w, x, y)
        norms = jnp.linalg.norm(g, axis=1)
        scale = jnp.where(sampled, jnp.minimum(1.0, l2_clip / jnp.maximum(norms, 1e-12)), 0.0)
        total = scale @ g + noise_multiplier * l2_clip * jax.random.normal(k_noise, w.shape)
        return w - lr * total / expected_batch, None

    w, _ = jax.lax.scan(step, jnp.zeros(x.shape[1] + 1, jnp.float32), steps_keys)
    return w


def _dpwave_dp_sgd(x, y, steps_keys, sampling_prob, noise_multiplier, l2_clip, lr):
    """The same training through dpwave's own DP-SGD (per-example clip, then its noise and Optax chain)."""
    tx = dp_optimizer(optax.sgd(lr), l2_clip=l2_clip, noise_multiplier=noise_multiplier,
                      expected_batch_size=sampling_prob * x.shape[0], key=jax.random.key(7))

    @jax.jit
    def train(x, y, steps_keys):
        def step(carry, k):
            w, state = carry
            mask = jax.random.bernoulli(k, sampling_prob, (x.shape[0],)).astype(jnp.float32)
            clipped_sum = clip_and_sum(per_example_grads(w, x, y), mask, l2_clip)[0]
            updates, state = tx.update(clipped_sum, state, w)
            return (optax.apply_updates(w, updates), state), None

        w0 = jnp.zeros(x.shape[1] + 1, jnp.float32)
        (w, _), _ = jax.lax.scan(step, (w0, tx.init(w0)), steps_keys)
        return w

    return train(x, y, steps_keys)


def audit_dp_sgd(*, seed, noise_multiplier, l2_clip, steps, sampling_prob, num_canaries,
                 num_guess, num_real=500, dim=20, lr=1.0, delta=1e-5, beta=0.05,
                 train=_dp_sgd):
    x, y, included = canary_dataset(seed, num_real, dim, num_canaries)
    keys = jax.random.split(jax.random.key(seed), steps)
    w = train(jnp.asarray(x), jnp.asarray(y), keys, sampling_prob, noise_multiplier,
              l2_clip, lr)
    scores = np.asarray(w[dim:dim + num_canaries])
    return audit.one_run_audit(scores, included, num_pos=num_guess, num_neg=num_guess,
                               delta=delta, beta=beta)


SETTING = dict(steps=200, sampling_prob=0.05, num_canaries=1000, num_guess=100)


@pytest.fixture(scope="module")
def claimed():
    """Accounted (epsilon, sigma) for the test setting: sigma calibrated to epsilon 2."""
    sigma = acc.calibrate_noise(2.0, 1e-5, SETTING["sampling_prob"], SETTING["steps"], "rdp")
    return acc.epsilon(sigma, SETTING["sampling_prob"], SETTING["steps"], 1e-5, "rdp"), sigma


def test_correctly_noised_dp_sgd_audits_below_its_epsilon(claimed):
    eps, sigma = claimed
    result = audit_dp_sgd(seed=1, noise_multiplier=sigma, l2_clip=1.0, **SETTING)
    assert result.epsilon_lower_bound < eps


def test_dp_sgd_without_noise_or_clipping_audits_far_above(claimed):
    eps, _ = claimed
    result = audit_dp_sgd(seed=1, noise_multiplier=0.0, l2_clip=1e9, **SETTING)
    assert result.num_correct == result.num_guesses == 200
    assert result.epsilon_lower_bound > max(2.0, eps)


def test_dp_sgd_with_ten_times_too_little_noise_is_caught(claimed):
    eps, sigma = claimed
    result = audit_dp_sgd(seed=1, noise_multiplier=sigma / 10, l2_clip=1.0, **SETTING)
    assert result.epsilon_lower_bound > eps


def test_dpwave_dp_sgd_audits_below_its_epsilon_and_catches_missing_noise(claimed):
    eps, sigma = claimed
    honest = audit_dp_sgd(seed=1, noise_multiplier=sigma, l2_clip=1.0, train=_dpwave_dp_sgd,
                          **SETTING)
    assert honest.epsilon_lower_bound < eps
    broken = audit_dp_sgd(seed=1, noise_multiplier=sigma / 10, l2_clip=1.0,
                          train=_dpwave_dp_sgd, **SETTING)
    assert broken.epsilon_lower_bound > eps


@pytest.mark.slow
@pytest.mark.parametrize("seed", [2, 3, 4])
def test_bigger_audit_over_seeds(seed):
    # Epsilon 1 under PLD, 2,000 canaries: honest below, ten-times-too-little noise above.
    setting = dict(steps=300, sampling_prob=0.05, num_canaries=2000, num_guess=200)
    sigma = acc.calibrate_noise(1.0, 1e-5, 0.05, 300, "pld")
    eps = acc.epsilon(sigma, 0.05, 300, 1e-5, "pld")
    honest = audit_dp_sgd(seed=seed, noise_multiplier=sigma, l2_clip=1.0, **setting)
    assert honest.epsilon_lower_bound < eps
    broken = audit_dp_sgd(seed=seed, noise_multiplier=sigma / 10, l2_clip=1.0, **setting)
    assert broken.epsilon_lower_bound > eps
