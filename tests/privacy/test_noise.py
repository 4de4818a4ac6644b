"""Noise transform and the DP optimizer: distribution, keys, agreement with a materialized oracle, state, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers.dp_models import clip_and_sum, mlp_problem
from scipy import stats

from dpwave.privacy.clipping import clipped_grad
from dpwave.privacy.keys import example_keys
from dpwave.privacy.noise import NoiseState, noise_and_normalize
from dpwave.privacy.optimizers import dp_optimizer

pytestmark = pytest.mark.unit

FALSE_ALARM = 1e-6  # per statistical check below, two-sided
SIGMA, CLIP, EBS = 1.3, 0.7, 37.5


def _noiser(key=0, sigma=SIGMA):
    return noise_and_normalize(l2_clip=CLIP, noise_multiplier=sigma, expected_batch_size=EBS, key=key)


def _zeros():
    return {"a": jnp.zeros((300, 200)), "b": [jnp.zeros(1000), jnp.zeros((10, 10))]}


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def test_noise_is_gaussian_with_std_sigma_c_over_expected_batch_size():
    tx = _noiser()
    update = jax.jit(tx.update)
    state = tx.init(_zeros())
    draws = []
    for _ in range(4):
        out, state = update(_zeros(), state)
        draws.append(_flat(out).astype(np.float64))
    x = np.concatenate(draws)  # 244,400 coordinates over 4 steps
    n, std = x.size, SIGMA * CLIP / EBS
    # Known mean 0: sum(x^2) / std^2 ~ chi2(n). Each check fails by chance w.p. FALSE_ALARM; a
    # wrong normalizer (e.g. realized batch size, missing C or sigma) is off by far more than
    # the +-0.8% this window allows on std.
    chi2 = np.sum(x**2) / std**2
    assert stats.chi2.ppf(FALSE_ALARM / 2, n) < chi2 < stats.chi2.isf(FALSE_ALARM / 2, n)
    assert abs(x.mean()) / (std / np.sqrt(n)) < stats.norm.isf(FALSE_ALARM / 2)
    assert stats.kstest(x / std, "norm").pvalue > FALSE_ALARM
    assert int(state.count) == 4


def test_zero_noise_multiplier_only_normalizes():
    sums = {"a": jnp.arange(6.0).reshape(2, 3), "b": jnp.array([1.5])}
    tx = _noiser(sigma=0.0)
    out, state = tx.update(sums, tx.init(sums))
    np.testing.assert_array_equal(out["a"], sums["a"] / np.float32(EBS))
    np.testing.assert_array_equal(out["b"], sums["b"] / np.float32(EBS))
    assert int(state.count) == 1


def test_noise_keys_depend_on_key_and_step_only():
    tx = _noiser(key=5)
    zeros = _zeros()
    s0 = tx.init(zeros)
    update = jax.jit(tx.update)
    first, s1 = update(zeros, s0)
    again, _ = update(zeros, s0)
    second, _ = update(zeros, s1)
    np.testing.assert_array_equal(_flat(first), _flat(again))
    assert not np.any(_flat(first) == _flat(second))
    assert not np.any(_flat(first["b"][0]) == _flat(first["a"])[:1000])  # leaves independent
    typed, _ = jax.jit(_noiser(key=jax.random.key(5)).update)(zeros, s0)
    np.testing.assert_allclose(_flat(typed), _flat(first), rtol=1e-6)
    other, _ = _noiser(key=6).update(zeros, _noiser(key=6).init(zeros))
    assert not np.any(_flat(other) == _flat(first))
    rbg = _noiser(key=jax.random.key(5, impl="rbg"))
    rbg_out, _ = rbg.update(zeros, rbg.init(zeros))
    assert np.all(np.isfinite(_flat(rbg_out))) and not np.any(_flat(rbg_out) == _flat(first))


def test_state_is_plain_arrays_and_resumes_exactly(tmp_path):
    tx = _noiser(key=11)
    zeros = _zeros()
    state = tx.init(zeros)
    _, state = tx.update(zeros, state)
    leaves, treedef = jax.tree.flatten(state)
    assert all(not jnp.issubdtype(x.dtype, jax.dtypes.prng_key) for x in leaves)
    np.savez(tmp_path / "state.npz", *[np.asarray(x) for x in leaves])
    with np.load(tmp_path / "state.npz") as f:
        restored = treedef.unflatten([jnp.asarray(f[k]) for k in f.files])
    assert isinstance(restored, NoiseState)
    resumed, _ = tx.update(zeros, restored)
    straight, _ = tx.update(zeros, state)
    np.testing.assert_array_equal(_flat(resumed), _flat(straight))


def _per_example_setup():
    loss_fn, params, batch = mlp_problem(seed=2, batch=6)
    keys = example_keys(jax.random.key(1), batch)
    per_example = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0, 0))(params, batch, keys)
    # A padding row holding NaN gradients must not leak into either path.
    per_example = jax.tree.map(lambda g: g.at[4].set(jnp.nan), per_example)
    mask = jnp.array([1, 1, 1, 1, 0, 1], jnp.float32)
    oracle_sum = clip_and_sum(per_example, mask, CLIP)[0]  # materialized per-example gradients, clipped
    return loss_fn, params, batch, keys, oracle_sum, mask


def test_clipped_grad_then_noise_equals_the_materialized_oracle():
    loss_fn, params, batch, keys, oracle_sum, mask = _per_example_setup()
    batch = {k: v.at[4].set(jnp.nan) for k, v in batch.items()}
    grad_sum, _ = jax.jit(clipped_grad(loss_fn, l2_clip=CLIP))(params, batch, mask, keys)
    tx = _noiser(key=3)
    a, _ = tx.update(grad_sum, tx.init(params))
    b, _ = tx.update(oracle_sum, tx.init(params))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(_flat(b)))


def test_dp_adam_from_the_clipped_sum_agrees_with_the_oracle_and_resumes_exactly():
    loss_fn, params, batch, keys, oracle_sum, mask = _per_example_setup()
    grad_sum, _ = jax.jit(clipped_grad(loss_fn, l2_clip=CLIP))(params, batch, mask, keys)
    opt = dp_optimizer(optax.adam(1e-2), l2_clip=CLIP, noise_multiplier=SIGMA, expected_batch_size=EBS, key=4)
    s_sum, s_oracle = opt.init(params), opt.init(params)
    for _ in range(2):
        u_sum, s_sum = opt.update(grad_sum, s_sum, params)
        u_oracle, s_oracle = opt.update(oracle_sum, s_oracle, params)
        for x, y in zip(jax.tree.leaves(u_sum), jax.tree.leaves(u_oracle)):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-7)
    leaves, treedef = jax.tree.flatten(s_sum)
    restored = treedef.unflatten([jnp.asarray(np.asarray(x)) for x in leaves])
    np.testing.assert_array_equal(
        _flat(opt.update(grad_sum, restored, params)[0]), _flat(opt.update(grad_sum, s_sum, params)[0])
    )


@pytest.mark.parametrize("inner, decay", [(optax.sgd(0.1), None), (optax.adam(0.1), 0.0),
                                          (optax.adamw(0.1, weight_decay=0.5), 0.5)], ids=["sgd", "adam", "adamw"])
def test_dp_optimizer_wraps_any_inner_optimizer(inner, decay):
    opt = dp_optimizer(inner, l2_clip=1.0, noise_multiplier=0.0, expected_batch_size=4.0, key=0)
    params = {"w": jnp.ones(3)}
    grad_sum = {"w": jnp.array([4.0, -4.0, 0.0])}  # sigma = 0: the mean clipped grad is exact
    updates, _ = opt.update(grad_sum, opt.init(params), params)
    if decay is None:
        np.testing.assert_allclose(updates["w"], [-0.1, 0.1, 0.0], rtol=1e-6)
    else:  # Adam's first step is lr * sign(mean grad); AdamW adds lr * weight_decay * w
        np.testing.assert_allclose(updates["w"], -0.1 * (np.array([1.0, -1.0, 0.0]) + decay), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(noise_multiplier=-0.1), "noise_multiplier"),
        (dict(expected_batch_size=0.0), "expected_batch_size"),
        (dict(l2_clip=0.0), "l2_clip"),
        (dict(key="seed"), "key"),
    ],
)
def test_dp_optimizer_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        dp_optimizer(optax.sgd(0.1), **{**dict(l2_clip=1.0, noise_multiplier=1.0, expected_batch_size=4.0, key=0),
                                        **overrides})
