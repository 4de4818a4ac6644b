"""High-frequency refiner: quality on held-out real digits, shapes, determinism, privacy, bad input."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers.training import train_refiner

from dpwave import wavelets as wv
from dpwave.data import DatasetSpec, load, to_float
from dpwave.models import refiner as rf

pytestmark = pytest.mark.unit

# Small enough to train in the fixture; the full-size comparison is experiments/bench/bench_refiner.py.
FIXTURE_CONFIG = rf.RefinerConfig(image_size=32, channels=1, levels=2, widths=(32, 16), num_blocks=2)
FIXTURE_STEPS = 150
EVAL_COUNT = 100


def _psnr(images, truth):
    mse = float(jnp.mean(jnp.square(jnp.clip(images, -1.0, 1.0) - truth)))
    return 10.0 * np.log10(4.0 / mse)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return os.fspath(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def trained(data_dir):
    """(graphdef, params, per-step losses) of a flow refiner trained on the public split."""
    public = load(DatasetSpec("mnist5k", "public", "public", data_dir=data_dir, in_memory=True))
    model, losses = train_refiner(public, FIXTURE_CONFIG, steps=FIXTURE_STEPS, batch_size=32, seed=0,
                                  learning_rate=2e-3)
    return (*nnx.split(model, nnx.Param), losses)


@pytest.fixture(scope="module")
def heldout(data_dir):
    """(images, pyramid) of EVAL_COUNT held-out test digits, in [-1, 1]."""
    test = load(DatasetSpec("mnist5k", "test", "public", data_dir=data_dir, in_memory=True))
    images = jnp.asarray(to_float(test.get_batch(np.arange(0, len(test), len(test) // EVAL_COUNT))["image"]))
    return images, wv.decompose(images, FIXTURE_CONFIG.levels)


def _refine(trained, heldout, seed, **kwargs):
    graphdef, params, _ = trained
    return rf.refine_fn(graphdef, params, heldout[1].coarse, jax.random.key(seed), **kwargs)


def test_beats_bicubic_in_psnr_and_sharpness_on_heldout_digits(trained, heldout):
    # Measured (150 steps, 100 test digits, keys 0-2): refiner 17.5-17.8 dB, sharpness (L2, L1) =
    # (0.73-0.76, 0.68-0.70); bicubic 15.5 dB, (0.14, 0.12). Sharpness = predicted / true detail energy.
    images, truth = heldout
    pred = _refine(trained, heldout, 0)
    bicubic = wv.upsample_coarse(truth.coarse, truth.levels, truth.image_hw)
    ours_psnr, bicubic_psnr = _psnr(wv.reconstruct(pred), images), _psnr(bicubic, images)
    ours_sharp = rf.detail_energy_ratio(pred, truth)
    bicubic_sharp = rf.detail_energy_ratio(wv.decompose(bicubic, truth.levels), truth)
    assert ours_psnr > bicubic_psnr + 1.0, (ours_psnr, bicubic_psnr)
    for ours, theirs in zip(ours_sharp, bicubic_sharp):
        assert ours > 3 * theirs and 0.5 < ours < 1.5, (ours_sharp, bicubic_sharp)
    losses = trained[2]
    assert losses[-1] < losses[0] / 2 and np.isfinite(losses).all()


def test_deterministic_for_a_key_and_keeps_the_coarse_band(trained, heldout):
    a, b, c = (_refine(trained, heldout, seed) for seed in (3, 3, 4))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert any(not np.allclose(x, z) for x, z in zip(jax.tree.leaves(a.details), jax.tree.leaves(c.details)))
    truth = heldout[1]
    np.testing.assert_array_equal(a.coarse, truth.coarse)
    again = wv.decompose(wv.reconstruct(a), truth.levels)  # the refined images have the given coarse band
    np.testing.assert_allclose(again.coarse, truth.coarse, atol=1e-4)


def test_one_euler_step_is_smoother_than_ten(trained, heldout):
    """One step returns the t=0 prediction (the conditional mean): less detail energy than a sample."""
    truth = heldout[1]
    one = rf.detail_energy_ratio(_refine(trained, heldout, 5, sample_steps=1), truth)
    ten = rf.detail_energy_ratio(_refine(trained, heldout, 5), truth)
    assert one[0] < ten[0] and one[1] < ten[1], (one, ten)


def _tiny(size=32, channels=1, levels=2, wavelet="haar", objective="flow", **kwargs):
    return rf.RefinerConfig(image_size=size, channels=channels, levels=levels, wavelet=wavelet,
                            widths=(8,) * levels, num_blocks=1, objective=objective, sample_steps=2, **kwargs)


def _per_example_grads(graphdef, params, images):
    def loss(p, image, key):
        return rf.refiner_loss(graphdef, p, {"image": image[None]}, key)[0]

    return jax.vmap(jax.grad(loss), in_axes=(None, 0, None))(params, images, jax.random.key(2))


@pytest.mark.parametrize("size,channels,levels,wavelet", [
    (32, 1, 1, "haar"), (32, 1, 2, "haar"), (64, 3, 3, "haar"), (32, 1, 2, "db2"), (64, 3, 2, "sym4")])
@pytest.mark.parametrize("objective", rf.OBJECTIVES)
def test_shapes_and_dtypes(size, channels, levels, wavelet, objective):
    """Traced only (jax.eval_shape): band shapes of every level, float32 outputs and per-example grads."""
    images = jax.ShapeDtypeStruct((3, size, size, channels), jnp.float32)
    truth = jax.eval_shape(lambda x: wv.decompose(x, levels, wavelet), images)
    graphdef, params = nnx.split(rf.Refiner(_tiny(size, channels, levels, wavelet, objective), rngs=nnx.Rngs(0)),
                                 nnx.Param)
    pred = jax.eval_shape(lambda c: rf.refine_fn(graphdef, params, c, jax.random.key(1)), truth.coarse)
    assert jax.tree.map(lambda x: x.shape, pred.details) == jax.tree.map(lambda x: x.shape, truth.details)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(pred))
    assert jax.eval_shape(wv.reconstruct, pred).shape == images.shape
    grads = jax.eval_shape(lambda x: _per_example_grads(graphdef, params, x), images)
    for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(params)):
        assert g.shape == (3, *p.shape) and g.dtype == jnp.float32


@pytest.mark.slow  # about 25 s; non-Haar wavelets' boundary handling is in tests/test_wavelets.py
def test_runs_with_boundary_coefficients():
    """db2 bands carry boundary coefficients (32 -> 17 -> 10): sample and evaluate the loss for real."""
    images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 1), minval=-1.0, maxval=1.0)
    truth = wv.decompose(images, 2, "db2")
    graphdef, params = nnx.split(rf.Refiner(_tiny(wavelet="db2"), rngs=nnx.Rngs(0)), nnx.Param)
    pred = rf.refine_fn(graphdef, params, truth.coarse, jax.random.key(1))
    out = wv.reconstruct(pred)
    assert out.shape == images.shape and np.isfinite(out).all()
    loss = jax.jit(rf.refiner_loss, static_argnums=0)(graphdef, params, {"image": images}, jax.random.key(2))[0]
    assert np.isfinite(loss) and loss > 0


def test_bfloat16_activations_keep_float32_params_and_outputs():
    graphdef, params = nnx.split(rf.Refiner(_tiny(dtype="bfloat16"), rngs=nnx.Rngs(0)), nnx.Param)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    pyr = jax.eval_shape(lambda c: rf.refine_fn(graphdef, params, c, jax.random.key(0)), jnp.zeros((2, 8, 8, 1)))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(pyr))
    batch = {"image": jnp.zeros((2, 32, 32, 1))}
    loss = jax.eval_shape(lambda p: rf.refiner_loss(graphdef, p, batch, jax.random.key(0))[0], params)
    assert loss.dtype == jnp.float32


def test_class_conditional_needs_labels():
    config = _tiny(num_classes=10)
    model = rf.Refiner(config, rngs=nnx.Rngs(0))
    coarse = jnp.zeros((2, 8, 8, 1))
    pyr = jax.eval_shape(lambda c, y: rf.refine(model, c, jax.random.key(0), label=y), coarse, jnp.array([3, 7]))
    assert pyr.details[-1][0].shape == (2, 16, 16, 1)
    graphdef, params = nnx.split(model, nnx.Param)
    batch = {"image": np.zeros((2, 32, 32, 1), np.uint8), "label": np.array([1, 2], np.int32)}
    assert jax.eval_shape(lambda p: rf.refiner_loss(graphdef, p, batch, jax.random.key(0))[0], params).shape == ()
    with pytest.raises(ValueError, match="pass label"):
        rf.refine(model, coarse, jax.random.key(0))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        rf.refine(model, coarse, jax.random.key(0), label=jnp.array([1, 2, 3]))
    unconditional = rf.Refiner(dataclasses.replace(config, num_classes=None), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="label=None"):
        rf.refine(unconditional, coarse, jax.random.key(0), label=jnp.array([3, 7]))


def test_regression_ignores_the_key():
    model = rf.Refiner(_tiny(objective="regression"), rngs=nnx.Rngs(0))
    coarse = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
    a, b = rf.refine(model, coarse, jax.random.key(1)), rf.refine(model, coarse, jax.random.key(2))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("kwargs,match", [
    (dict(widths=(32,)), "one width per level"),
    (dict(levels=6), "at most 5"),
    (dict(objective="gan"), "objective"),
    (dict(dtype="int8"), "dtype"),
    (dict(wavelet="nope"), "unknown wavelet"),
    (dict(mode="periodic"), "mode"),
    (dict(cond_noise=-0.1), "cond_noise"),
    (dict(image_size=30, levels=2), "at most 1"),
    (dict(num_classes=0), "num_classes"),
    (dict(sample_steps=0), "sample_steps"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rf.RefinerConfig(**kwargs)


def test_from_dict_and_input_errors():
    assert rf.RefinerConfig.from_dict({"widths": [16, 16]}).widths == (16, 16)
    with pytest.raises(ValueError, match="unknown RefinerConfig keys"):
        rf.RefinerConfig.from_dict({"width": 16})
    model = rf.Refiner(_tiny(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"expects \(N, 8, 8, 1\)"):
        rf.refine(model, jnp.zeros((2, 16, 16, 1)), jax.random.key(0))
    with pytest.raises(ValueError, match="sample_steps"):
        rf.refine(model, jnp.zeros((2, 8, 8, 1)), jax.random.key(0), sample_steps=0)
