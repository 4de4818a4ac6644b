"""`steps.dp_step`: one jitted call is the step key, the per-example keys, the clipped sum, the mechanism's noise and
optimizer, and the EMA, in that order; `steps.public_step`: a data-parallel mean-gradient step."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpwave import privacy
from dpwave.privacy.keys import example_keys
from dpwave.train import distributed, steps
from dpwave.train.checkpoint import Checkpointer

pytestmark = pytest.mark.unit

CLIP, EXPECTED, DECAY = 0.5, 4.0, 0.9


def _example_loss(params, example, key):
    """A linear model whose loss draws from the example's key (so a wrong key changes the gradient)."""
    noise = jax.random.normal(key, example["x"].shape)
    return jnp.sum((params["w"] * (example["x"] + noise) - example["y"]) ** 2)


def _setup(ema_decay: float = 0.0):
    rng = np.random.default_rng(0)
    batch = {"x": rng.normal(size=(6, 3)).astype(np.float32), "y": rng.normal(size=(6, 3)).astype(np.float32)}
    mask = np.array([1, 1, 1, 1, 0, 0], np.float32)
    params = {"w": jnp.asarray(rng.normal(size=3), jnp.float32)}
    optimizer = privacy.dp_optimizer(optax.sgd(0.1), l2_clip=CLIP, noise_multiplier=0.0,
                                     expected_batch_size=EXPECTED, key=0)
    step = steps.dp_step(privacy.clipped_grad(_example_loss, l2_clip=CLIP), optimizer,
                         distributed.make_data_mesh(jax.devices()[:1]), ema_decay=ema_decay)
    state = steps.TrainState(params, optimizer.init(params), jax.tree.map(jnp.copy, params) if ema_decay else None)
    return step, state, batch, mask


def _copy(tree):
    """A copy of a state to keep: the step donates (consumes) the one it is given."""
    return jax.tree.map(jnp.copy, tree)


def test_the_step_clips_each_example_under_its_content_key_of_the_folded_step_key():
    step, state, batch, mask = _setup()
    key, index = jax.random.key(7), 3
    new, metrics = step(_copy(state), batch, mask, key, index)
    keys = example_keys(jax.random.fold_in(key, index), batch)
    total = np.zeros(3, np.float32)
    for i in range(4):  # the real rows; the padded ones contribute nothing
        example = {k: v[i] for k, v in batch.items()}
        g = np.asarray(jax.grad(_example_loss)(state.params, example, keys[i])["w"])
        total += g * min(1.0, CLIP / np.linalg.norm(g))
    np.testing.assert_allclose(new.params["w"], state.params["w"] - 0.1 * total / EXPECTED, rtol=1e-4, atol=1e-5)
    assert float(metrics["batch_size"]) == 4
    other, _ = step(state, batch, mask, key, index + 1)
    assert not np.allclose(other.params["w"], new.params["w"])  # another step index: other example keys


def test_the_ema_follows_the_new_parameters_inside_the_step():
    step, state, batch, mask = _setup(DECAY)
    new, _ = step(_copy(state), batch, mask, jax.random.key(1), 0)
    np.testing.assert_allclose(new.extra["w"], DECAY * state.params["w"] + (1 - DECAY) * new.params["w"],
                               rtol=1e-5, atol=1e-6)
    plain, _ = _setup()[0](steps.TrainState(*_copy((state.params, state.opt_state))), batch, mask, jax.random.key(1), 0)
    np.testing.assert_allclose(plain.params["w"], new.params["w"], rtol=1e-5, atol=1e-6)  # the EMA changes nothing else


def test_the_public_step_takes_the_mean_gradient():
    mesh = distributed.make_data_mesh(jax.devices()[:1])
    params = {"w": jnp.ones(2)}

    def loss_fn(p, batch, rng):
        return jnp.mean(jnp.sum((p["w"] * batch["x"]) ** 2, axis=-1)), {}

    optimizer = optax.sgd(1.0)
    batch = {"x": jnp.asarray([[1.0, 2.0], [3.0, 4.0]])}
    new, metrics = steps.public_step(loss_fn, optimizer, mesh)(steps.TrainState(params, optimizer.init(params)),
                                                             batch, jax.random.key(0))
    grad = np.mean(2 * np.asarray(batch["x"]) ** 2, axis=0)  # d/dw of mean_i sum_j (w_j x_ij)^2 at w = 1
    np.testing.assert_allclose(new.params["w"], 1.0 - grad, rtol=1e-5)
    assert float(metrics["loss"]) == pytest.approx(np.mean(np.sum(np.asarray(batch["x"]) ** 2, axis=-1)))


def test_both_steps_consume_the_state_they_are_given():
    step, state, batch, mask = _setup(DECAY)
    step(state, batch, mask, jax.random.key(1), 0)
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves((state.params, state.extra)))
    mesh = distributed.make_data_mesh(jax.devices()[:1])
    public = steps.public_step(lambda p, b, rng: (jnp.sum(p["w"] * b["x"]), {}), optax.sgd(0.1), mesh)
    given = steps.TrainState({"w": jnp.ones(3)}, optax.sgd(0.1).init({"w": jnp.ones(3)}))
    public(given, {"x": jnp.ones((2, 3))}, jax.random.key(0))
    assert given.params["w"].is_deleted()


def test_a_checkpoint_in_flight_keeps_the_donated_state_it_was_given(tmp_path):
    """The asynchronous save holds the state's host view while the next steps overwrite the state's buffers:
    what it writes is the state at the save, not a later one."""
    _, _, batch, mask = _setup()
    optimizer = privacy.dp_optimizer(optax.sgd(1000.0), l2_clip=CLIP, noise_multiplier=0.0,
                                     expected_batch_size=EXPECTED, key=0)
    step = steps.dp_step(privacy.clipped_grad(lambda p, e, k: jnp.sum(p["w"]), l2_clip=CLIP),
                         optimizer, distributed.make_data_mesh(jax.devices()[:1]), ema_decay=DECAY)
    params = {"w": jnp.linspace(-1.0, 1.0, 300_000)}  # big enough to be written while the steps run
    state = steps.TrainState(params, optimizer.init(params), jax.tree.map(jnp.copy, params))
    host = lambda tree: [np.array(jax.random.key_data(a) if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)
                                  else a) for a in jax.tree.leaves(tree)]
    saved = host(state)
    with Checkpointer(str(tmp_path)) as ckpt:
        ckpt.save(1, state, meta={}, force=True)
        for i in range(3):
            state, _ = step(state, batch, mask, jax.random.key(1), i)
        assert not np.allclose(state.params["w"], saved[0], atol=0.1)  # the steps did move the parameters
    with Checkpointer(str(tmp_path)) as ckpt:
        _, restored, _ = ckpt.restore_latest(state)
    for got, want in zip(host(restored), saved):
        np.testing.assert_array_equal(got, want)
