"""Tests of the spectral tokenizer and its vector quantizer.

Quality numbers (measured on this 2-core machine; thresholds sit a little below them) are stated
next to each quality test.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers.training import train_tokenizer

from dpwave import wavelets
from dpwave.data import load, to_float
from dpwave.models import tokenizer as tok
from dpwave.models import vq
from experiments.bench.bench_tokenizer import (
    TEST_PHOTOS,
    TRAIN_PHOTOS,
    coarse_ceiling,
    photo_patches,
)

pytestmark = pytest.mark.unit

TINY = {"width": 8, "depth": 1, "codebook_size": 16, "code_dim": 4}


def _model(seed: int = 0, **overrides) -> tok.SpectralTokenizer:
    return tok.SpectralTokenizer(tok.TokenizerConfig(**{**TINY, **overrides}), rngs=nnx.Rngs(seed))


def _images(shape: tuple[int, ...], seed: int = 0) -> jax.Array:
    return jax.random.uniform(jax.random.key(seed), shape, jnp.float32, -1.0, 1.0)


def _jit(module: nnx.Module, fn):
    """``fn(module, *args)`` jitted functionally (eager NNX is slow on a loaded CPU)."""
    graphdef, state = nnx.split(module)
    run = jax.jit(lambda state, *args: fn(nnx.merge(graphdef, state), *args))
    return lambda *args: run(state, *args)


# -- vector quantizer ---------------------------------------------------------------------------------
def test_quantizer_picks_the_most_similar_code_and_passes_gradients_straight_through():
    q = vq.VectorQuantizer(32, 4, update="gradient", rngs=nnx.Rngs(0))
    z = jax.random.normal(jax.random.key(1), (5, 7, 4))
    out = _jit(q, lambda q, z: q(z))(z)
    book = q.codes()
    np.testing.assert_array_equal(out.codes, jnp.argmax(vq.l2_normalize(z) @ book.T, -1))
    np.testing.assert_allclose(out.quantized, book[out.codes], atol=1e-6)
    np.testing.assert_allclose(jnp.linalg.norm(out.latents, axis=-1), 1.0, atol=1e-5)
    weights = jnp.arange(4.0)
    grad = _jit(q, lambda q, u: jax.grad(lambda u: jnp.sum(q(u).quantized * weights))(u))(z)
    expected = jax.grad(lambda u: jnp.sum(vq.l2_normalize(u) * weights))(z)
    np.testing.assert_allclose(grad, expected, atol=1e-5)


def test_codebook_is_a_param_only_in_gradient_mode():
    for update, kind in (("gradient", nnx.Param), ("ema", vq.CodebookEma)):
        q = vq.VectorQuantizer(8, 3, update=update, rngs=nnx.Rngs(0))
        assert type(q.codebook) is kind
        _, params, _ = nnx.split(q, nnx.Param, ...)
        assert ("codebook" in params) == (update == "gradient")
    with pytest.raises(ValueError, match="ema"):
        vq.VectorQuantizer(8, 3, update="kmeans", rngs=nnx.Rngs(0))


def test_ema_update_moves_used_codes_toward_their_latents_and_restarts_dead_codes():
    q = vq.VectorQuantizer(4, 2, update="ema", rngs=nnx.Rngs(0))
    q.usage.value = jnp.array([0.5, 0.5, 0.0, 0.0])  # codes 2, 3 are dead
    target = vq.l2_normalize(jnp.array([[1.0, 1.0]]))
    latents = jnp.repeat(target, 6, axis=0)
    codes = jnp.zeros((6,), jnp.int32)
    before = q.codes()[0]
    restarted = q.update_codebook(latents, codes, jax.random.key(0), decay=0.5, dead_threshold=0.5)
    assert int(restarted) == 2
    assert float(q.codes()[0] @ target[0]) > float(before @ target[0])
    np.testing.assert_allclose(q.codes()[2:], jnp.repeat(target, 2, axis=0), atol=1e-6)
    np.testing.assert_allclose(q.usage.value, [0.75, 0.25, 0.25, 0.25], atol=1e-6)
    unchanged = q.codes()[1]
    q.update_codebook(latents, codes, jax.random.key(1), decay=0.5, dead_threshold=0.0)
    np.testing.assert_allclose(q.codes()[1], unchanged, atol=1e-6)


def test_codebook_usage_fraction_and_perplexity():
    usage = vq.codebook_usage(jnp.array([0, 1, 2, 3] * 5), 8)
    assert usage.fraction_used == pytest.approx(0.5)
    assert usage.perplexity == pytest.approx(4.0, rel=1e-5)
    assert vq.codebook_usage(jnp.zeros((10,), jnp.int32), 8).perplexity == pytest.approx(1.0)
    with pytest.raises(ValueError, match="outside"):
        vq.codebook_usage(jnp.array([0, 9]), 8)


# -- configuration ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"patch_sizes": (2, 2)}, "one patch size per scale"),
        ({"patch_sizes": (3, 2, 4)}, r"patch_sizes\[0\]=3 does not divide.*8x8.*\[1, 2, 4, 8\]"),
        ({"image_size": (30, 32)}, "not divisible by 2\\^levels"),
        ({"wavelet": "nope"}, "unknown wavelet"),
        ({"codebook_update": "kmeans"}, "codebook_update"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"dead_code_threshold": -0.1}, "dead_code_threshold"),
        ({"levels": 0}, "levels"),
        ({"codebook_size": 1}, "codebook_size"),
        ({"image_size": (32,)}, "image_size"),
    ],
)
def test_config_rejects_bad_values_with_a_fix(overrides, match):
    with pytest.raises(ValueError, match=match):
        tok.TokenizerConfig(**overrides)


def test_config_layout_and_vocabulary():
    c = tok.TokenizerConfig(image_size=(32, 64), levels=2, patch_sizes=[4, 2, 4], codebook_size=100)
    assert c.band_shapes == ((8, 16, 1), (8, 16, 3), (16, 32, 3))
    assert c.tokens_per_scale == (8, 32, 32)
    assert c.scale_boundaries == (8, 40, 72)
    assert c.vocab_size == 300
    assert hash(c) == hash(tok.TokenizerConfig(image_size=(32, 64), levels=2, patch_sizes=(4, 2, 4), codebook_size=100))


# -- shapes, prefixes, jit ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "image_size, channels, levels, patch_sizes, wavelet",
    [
        ((16, 32), 3, 1, (1, 4), "haar"),
        ((32, 32), 1, 3, (1, 2, 2, 4), "haar"),
        ((16, 16), 2, 1, (1, 1), "db2"),
    ],
)
def test_shapes_dtypes_and_token_ranges(image_size, channels, levels, patch_sizes, wavelet):
    m = _model(image_size=image_size, channels=channels, levels=levels, patch_sizes=patch_sizes, wavelet=wavelet)
    x = _images((3, *image_size, channels))

    def everything(m, x):
        tokens = m.encode(x)
        return tokens, m.encode(x, scales="coarse"), m.decode_coarse(tokens), m.decode(tokens)

    tokens, coarse, band, images = _jit(m, everything)(x)
    assert tokens.dtype == jnp.int32 and tokens.shape == (3, m.scale_boundaries[-1])
    assert m.scale_boundaries[-1] == sum(m.tokens_per_scale)
    starts = [0] + m.scale_boundaries[:-1]
    for s, (a, b) in enumerate(zip(starts, m.scale_boundaries)):
        k = m.config.codebook_size
        assert int(tokens[:, a:b].min()) >= s * k and int(tokens[:, a:b].max()) < (s + 1) * k
    np.testing.assert_array_equal(coarse, tokens[:, : m.tokens_per_scale[0]])
    assert band.shape == (3, *m.config.band_shapes[0])
    assert images.shape == x.shape and images.dtype == jnp.float32


def test_coarse_prefix_decodes_to_the_coarse_only_reconstruction_of_the_decoded_band():
    m = _model()
    x = _images((4, 32, 32, 1))
    tokens = _jit(m, lambda m, x: m.encode(x))(x)
    band, prefix_images = _jit(m, lambda m, t: (m.decode_coarse(t), m.decode(t[:, :16])))(tokens)
    template = wavelets.decompose(x, m.config.levels)
    expected = wavelets.reconstruct(wavelets.coarse_only(dataclasses.replace(template, coarse=band)))
    np.testing.assert_allclose(prefix_images, expected, atol=1e-5)


def test_finer_tokens_do_not_change_coarser_decoded_scales():
    m = _model()
    encode = _jit(m, lambda m, x: m.encode(x))
    tokens = encode(_images((2, 32, 32, 1)))
    other = tokens.at[:, 32:].set(encode(_images((2, 32, 32, 1), seed=5))[:, 32:])
    decode_scales = _jit(m, lambda m, t: m.decode_scales(t))
    a, b = decode_scales(tokens), decode_scales(other)
    np.testing.assert_allclose(a[0], b[0]), np.testing.assert_allclose(a[1], b[1])
    assert not np.allclose(a[2], b[2])
    np.testing.assert_allclose(_jit(m, lambda m, t: m.decode_coarse(t))(tokens[:, :16]), a[0], atol=1e-6)


def test_everything_jits_and_matches_eager():
    m = _model(image_size=(16, 16), levels=1, patch_sizes=(2, 2))
    graphdef, state = nnx.split(m)
    x = _images((2, 16, 16, 1))

    @jax.jit
    def roundtrip(state, x):
        model = nnx.merge(graphdef, state)
        tokens = model.encode(x)
        return tokens, model.decode(tokens), model.decode_coarse(tokens)

    tokens, images, band = roundtrip(state, x)
    np.testing.assert_array_equal(tokens, m.encode(x))
    np.testing.assert_allclose(images, m.decode(tokens), atol=1e-5)
    np.testing.assert_allclose(band, m.decode_coarse(tokens), atol=1e-5)


def test_bad_inputs_name_the_problem():
    m = _model()
    with pytest.raises(ValueError, match=r"\(32, 32, 1\)"):
        m.encode(_images((2, 16, 16, 1)))
    with pytest.raises(ValueError, match="to_float"):
        m.encode(jnp.zeros((2, 32, 32, 1), jnp.uint8))
    with pytest.raises(ValueError, match="coarse"):
        m.encode(_images((2, 32, 32, 1)), scales="fine")
    with pytest.raises(ValueError, match=r"scale boundary \[16, 32, 96\]"):
        m.decode(jnp.zeros((2, 20), jnp.int32))


# -- training -----------------------------------------------------------------------------------------
def test_calibrate_sets_each_band_scale_to_its_rms_outside_the_params():
    m = _model()
    x = _images((8, 32, 32, 1))
    np.testing.assert_allclose(m.band_scales(), [4.0, 4.0, 2.0])  # uncalibrated: the Haar gains
    m.calibrate(x)
    rms = [jnp.sqrt(jnp.mean(b**2)) for b in wavelets.decompose(x, 2).scales()]
    np.testing.assert_allclose(m.band_scales(), rms, rtol=1e-6)
    m.calibrate(x * 0.5, overwrite=False)  # already calibrated: kept
    np.testing.assert_allclose(m.band_scales(), rms, rtol=1e-6)
    _, _, rest = nnx.split(m, nnx.Param, ...)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(rest)]
    assert any("band_scale" in p for p in paths)


def test_train_step_calibrates_an_uncalibrated_model_on_its_first_batch():
    model = _model(image_size=(16, 16), levels=1, patch_sizes=(2, 2))
    optimizer = tok.make_optimizer(1e-3, 2)
    graphdef, state = tok.init_train_state(model, optimizer)
    x = _images((4, 16, 16, 1))
    step = jax.jit(functools.partial(tok.train_step, optimizer=optimizer), static_argnums=0)
    state, _ = step(graphdef, state, x, jax.random.key(0))
    state, _ = step(graphdef, state, x * 0.1, jax.random.key(1))
    rms = [jnp.sqrt(jnp.mean(b**2)) for b in wavelets.decompose(x, 1).scales()]
    np.testing.assert_allclose(nnx.merge(graphdef, state.params, state.stats).band_scales(), rms, rtol=1e-5)


@pytest.mark.parametrize("update", ["ema", "gradient"])
def test_train_step_is_pure_deterministic_and_learns(update):
    model = _model(codebook_update=update, image_size=(16, 16), levels=1, patch_sizes=(2, 2))
    optimizer = tok.make_optimizer(3e-3, 20)
    step = jax.jit(functools.partial(tok.train_step, optimizer=optimizer), static_argnums=0)
    x = jnp.tile(_images((4, 16, 16, 1)), (2, 1, 1, 1))

    def run():
        graphdef, state = tok.init_train_state(model, optimizer)
        losses = []
        for i in range(20):
            state, metrics = step(graphdef, state, x, jax.random.key(i))
            losses.append(float(metrics["loss"]))
        return state, losses

    (s1, l1), (s2, l2) = run(), run()
    assert l1 == l2
    jax.tree.map(np.testing.assert_array_equal, s1.params, s2.params)
    assert int(s1.step) == 20 and l1[-1] < 0.7 * l1[0]
    holder = s1.params if update == "gradient" else s1.stats
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(holder)]
    assert sum("codebook" in p for p in paths) == 2


# -- quality on held-out real images ------------------------------------------------------------------
def _train_and_score(train, test, config: tok.TokenizerConfig, steps: int) -> dict:
    model = train_tokenizer(train, config, steps=steps, batch_size=32, seed=0, learning_rate=5e-3)
    images = jnp.asarray(to_float(test.get_batch(np.arange(len(test)))["image"]))
    return {**tok.reconstruction_psnr(model, images), "ceiling": coarse_ceiling(images, config)}


def _mnist(split: str):
    return load({"name": "mnist5k", "split": split, "privacy": "public", "in_memory": True})


@pytest.fixture(scope="module")
def mnist_small() -> dict:
    """A small tokenizer, 150 steps on the 1,500 public digits, scored on the 500 held-out digits."""
    config = tok.TokenizerConfig(width=32, depth=1, codebook_size=128)
    return _train_and_score(_mnist("public"), _mnist("heldout"), config, steps=150)


def test_small_tokenizer_round_trips_heldout_digits(mnist_small):
    # Measured: all scales 15.5 dB, coarse band 18.0 dB; the exact coarse-only image scores 14.85 dB,
    # so the detail tokens carry real information.
    assert mnist_small["all"] > 14.5
    assert mnist_small["all"] > mnist_small["ceiling"] + 0.3
    assert mnist_small["coarse"] > 17.0


def test_small_tokenizer_uses_its_codebooks(mnist_small):
    # Measured: every scale uses all 128 codes; perplexities 100 / 79 / 37.
    for usage in mnist_small["usage"]:
        assert usage["fraction_used"] > 0.9
        assert usage["perplexity"] > 25


@pytest.mark.slow
def test_default_tokenizer_quality_on_heldout_digits():
    # Measured (800 steps, batch 32): all scales 23.67 dB,
    # coarse band 29.49 dB, all codes of every scale used.
    scores = _train_and_score(_mnist("public"), _mnist("test"), tok.TokenizerConfig(), steps=800)
    assert scores["all"] > 23.0 and scores["coarse"] > 28.5
    assert min(u["fraction_used"] for u in scores["usage"]) > 0.9


@pytest.mark.slow
def test_default_tokenizer_quality_on_heldout_photos():
    # Train on crops of astronaut/coffee/immunohistochemistry, test on chelsea/rocket. Measured (800
    # steps): all scales 23.80 dB, coarse band 24.82 dB, coarse-only decode 22.69 dB
    # (the detail tokens add 1.1 dB); coarse codebook usage 0.55.
    train, test = photo_patches(TRAIN_PHOTOS, 1500, seed=0), photo_patches(TEST_PHOTOS, 500, seed=1)
    scores = _train_and_score(train, test, tok.TokenizerConfig(channels=3), steps=800)
    assert scores["all"] > 23.0 and scores["coarse"] > 24.0
    assert scores["all"] > scores["coarse_vs_images"] + 0.5
    assert min(u["fraction_used"] for u in scores["usage"]) > 0.3
