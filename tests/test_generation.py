"""Tests of the generation pipeline with tiny, randomly initialized models (32x32x1, 2 Haar levels)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dpwave import generation, wavelets
from dpwave.data import to_uint8
from dpwave.models.refiner import Refiner, RefinerConfig, refine_fn
from dpwave.models.text import encode_captions
from dpwave.models.tokenizer import SpectralTokenizer, TokenizerConfig
from dpwave.models.transformer import ARTransformer, TransformerConfig

pytestmark = pytest.mark.unit

TOK = TokenizerConfig(image_size=(32, 32), channels=1, levels=2, patch_sizes=(2, 2, 4), codebook_size=16,
                      code_dim=4, width=8, depth=1)
AR = dict(width=16, depth=1, num_heads=2, mlp_dim=32, text_depth=1)
COARSE_AR = TransformerConfig(vocab_size=TOK.codebook_size, seq_len=TOK.tokens_per_scale[0], num_classes=10, **AR)
FULL_AR = TransformerConfig(vocab_size=TOK.vocab_size, seq_len=TOK.scale_boundaries[-1], num_classes=10,
                            scale_boundaries=TOK.scale_boundaries, **AR)
REF = RefinerConfig(image_size=32, channels=1, levels=2, widths=(8, 8), num_blocks=1, sample_steps=2, num_classes=10)
LABELS = np.array([0, 3, 7, 9], np.int32)
KEY = jax.random.key(0)
METHODS = ("dpwave", "full_dp", "bicubic")


def random_model(cls, config, seed: int):
    """A model of ``config`` with random numpy weights (no per-op XLA compiles, unlike a real init):
    kernels ~ N(0, 1/fan_in), norm and band scales ~ 1, other vectors ~ N(0, 0.1)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if jax.tree_util.keystr(path).endswith("scale'].value"):
            return jnp.asarray(1.0 + 0.1 * np.abs(rng.normal(size=leaf.shape)), leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 100
        return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(fan_in), leaf.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


@functools.cache
def models() -> dict:
    return dict(tokenizer=random_model(SpectralTokenizer, TOK, 0), coarse_ar=random_model(ARTransformer, COARSE_AR, 1),
                full_ar=random_model(ARTransformer, FULL_AR, 2), refiner=random_model(Refiner, REF, 3))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _tokenizer_apply(graphdef, method: str, state, tokens):
    return getattr(nnx.merge(graphdef, state), method)(tokens)


def tokenizer_apply(method: str, tokens) -> np.ndarray:
    """Jitted ``tokenizer.<method>(tokens)`` of the test tokenizer."""
    graphdef, state = nnx.split(models()["tokenizer"])
    return np.asarray(_tokenizer_apply(graphdef, method, state, jnp.asarray(tokens)))


@functools.cache
def generator(method: str) -> generation.Generator:
    m = models()
    ar = m["full_ar"] if method == "full_dp" else m["coarse_ar"]
    return generation.make_generator(method, m["tokenizer"], ar, m["refiner"] if method == "dpwave" else None,
                                 guidance_scale=1.0, top_k=12)


@functools.cache
def outputs(method: str, seed: int = 0) -> dict:
    return jax.device_get(generation.generate(generator(method), LABELS, jax.random.key(seed)))


@pytest.mark.parametrize("method", METHODS)
def test_outputs_have_expected_shapes_dtypes_and_range(method):
    out = outputs(method)
    expected = {"images", "coarse_images", "tokens", "coarse"} | ({"unrefined"} if method == "dpwave" else set())
    assert set(out) == expected
    for name in expected & set(generation.IMAGE_KEYS):
        assert out[name].shape == (4, 32, 32, 1) and out[name].dtype == np.float32, name
        assert np.all(np.isfinite(out[name])) and out[name].min() >= -1.0 and out[name].max() <= 1.0, name
    assert out["coarse"].shape == (4, 8, 8, 1) and out["coarse"].dtype == np.float32
    num_tokens = 48 if method == "full_dp" else 16
    vocab = TOK.vocab_size if method == "full_dp" else TOK.codebook_size
    assert out["tokens"].shape == (4, num_tokens) and out["tokens"].dtype == np.int32
    assert out["tokens"].min() >= 0 and out["tokens"].max() < vocab


@pytest.mark.parametrize("method", METHODS)
def test_deterministic_for_a_key_and_different_across_keys(method):
    again = jax.device_get(generation.generate(generator(method), LABELS, jax.random.key(0)))
    for name, value in outputs(method).items():
        np.testing.assert_array_equal(again[name], value, err_msg=name)
    assert not np.array_equal(outputs(method, 1)["tokens"], outputs(method)["tokens"])
    assert not np.allclose(outputs(method, 1)["images"], outputs(method)["images"])


def test_dpwave_refiner_only_adds_detail_bands():
    out, refiner = outputs("dpwave"), models()["refiner"]
    np.testing.assert_allclose(out["coarse"], tokenizer_apply("decode_coarse", out["tokens"]), rtol=1e-5, atol=1e-5)
    # The refiner's own jitted entry point, on the decoded DP coarse band ([-1, 1] image units).
    unit = refine_fn(*nnx.split(refiner), jnp.asarray(out["coarse"]), jax.random.fold_in(KEY, 1), jnp.asarray(LABELS))
    images = wavelets.reconstruct(unit)
    np.testing.assert_allclose(out["images"], jnp.clip(images, -1, 1), atol=1e-5)
    # The images carry exactly the decoded DP coarse band; the refiner only added detail bands.
    np.testing.assert_allclose(wavelets.decompose(images, 2).coarse, out["coarse"], rtol=1e-5, atol=1e-4)
    assert min(float(jnp.abs(b).max()) for bands in unit.details for b in bands) > 0.01
    assert not np.allclose(out["images"], out["unrefined"], atol=0.05)


def test_baselines_decode_as_specified():
    full = outputs("full_dp")
    np.testing.assert_allclose(full["images"], np.clip(tokenizer_apply("decode", full["tokens"]), -1, 1), atol=1e-5)
    np.testing.assert_allclose(full["coarse"], tokenizer_apply("decode_coarse", full["tokens"]), rtol=1e-5,
                               atol=1e-5)
    bicubic = outputs("bicubic")
    coarse = jnp.asarray(bicubic["coarse"])
    for name, method in (("images", "bicubic"), ("coarse_images", "nearest")):
        expected = jnp.clip(wavelets.upsample_coarse(coarse, 2, (32, 32), method=method), -1, 1)
        np.testing.assert_allclose(bicubic[name], expected, atol=1e-5, err_msg=name)
    # Nearest display repeats each coarse pixel over a 4x4 block.
    np.testing.assert_array_equal(bicubic["coarse_images"][:, ::4, ::4], bicubic["coarse_images"][:, 3::4, 3::4])


def test_generate_many_batches_with_fold_in_and_pads_the_last_batch():
    g = generator("dpwave")
    conds = np.array([1, 2, 3, 4, 5, 6], np.int32)
    many = generation.generate_many(g, conds, KEY, batch_size=4)
    assert set(many) == {"images", "coarse_images", "unrefined"}
    assert all(v.shape == (6, 32, 32, 1) and v.dtype == np.uint8 for v in many.values())
    first = generation.generate(g, conds[:4], jax.random.fold_in(KEY, 0))
    last = generation.generate(g, np.array([5, 6, 6, 6], np.int32), jax.random.fold_in(KEY, 1))
    for name in many:
        np.testing.assert_array_equal(many[name][:4], to_uint8(first[name]), err_msg=name)
        np.testing.assert_array_equal(many[name][4:], to_uint8(last[name][:2]), err_msg=name)


def test_caption_and_unconditional_generators():
    m = models()
    text_ar = random_model(ARTransformer, TransformerConfig(vocab_size=16, seq_len=16, max_text_len=8, **AR), 7)
    g = generation.make_generator("bicubic", m["tokenizer"], text_ar, guidance_scale=2.0)
    captions = encode_captions(["a zero", "a three", "", "nine"], 8)
    out = generation.generate(g, captions, KEY)
    assert out["images"].shape == (4, 32, 32, 1) and out["tokens"].shape == (4, 16)
    np.testing.assert_array_equal(generation.generate(g, captions, KEY)["tokens"], out["tokens"])

    free_ar = random_model(ARTransformer, TransformerConfig(vocab_size=16, seq_len=16, **AR), 8)
    free = generation.make_generator("bicubic", m["tokenizer"], free_ar)
    many = generation.generate_many(free, None, KEY, batch_size=4, num_samples=5)
    assert many["images"].shape == (5, 32, 32, 1) and many["images"].dtype == np.uint8
    one = generation.generate(free, None, jax.random.fold_in(KEY, 1), num_samples=4)
    np.testing.assert_array_equal(many["images"][4:], to_uint8(one["images"][:1]))
    with pytest.raises(ValueError, match="guidance_scale"):
        generation.make_generator("bicubic", m["tokenizer"], free_ar, guidance_scale=1.0)
    with pytest.raises(ValueError, match="num_samples"):
        generation.generate(free, None, KEY)


@pytest.mark.parametrize("build, match", [
    (lambda m: dict(method="vqgan", transformer=m["coarse_ar"]), "method"),
    (lambda m: dict(method="dpwave", transformer=m["coarse_ar"]), "needs a refiner"),
    (lambda m: dict(method="bicubic", transformer=m["coarse_ar"], refiner=m["refiner"]), "no refiner"),
    (lambda m: dict(method="dpwave", transformer=m["full_ar"], refiner=m["refiner"]), "seq_len=16"),
    (lambda m: dict(method="full_dp", transformer=m["coarse_ar"]), "seq_len=48"),
    (lambda m: dict(method="bicubic", transformer=m["coarse_ar"], temperature=0.0), "temperature"),
    (lambda m: dict(method="bicubic", transformer=m["coarse_ar"], top_k=17), "top_k"),
    (lambda m: dict(method="bicubic", transformer=m["coarse_ar"], top_p=1.5), "top_p"),
    (lambda m: dict(method="dpwave", transformer=m["coarse_ar"], refiner=nnx.eval_shape(
        lambda: Refiner(RefinerConfig(image_size=32, levels=3, widths=(8, 8, 8)), rngs=nnx.Rngs(0)))), "levels"),
])
def test_make_generator_rejects_bad_setups(build, match):
    m = models()
    with pytest.raises(ValueError, match=match):
        generation.make_generator(tokenizer=m["tokenizer"], **build(m))


def test_config_style_settings_disable_the_filters():
    m = models()
    g = generation.make_generator("bicubic", m["tokenizer"], m["coarse_ar"], top_k=0, top_p=1.0, temperature=0.7)
    assert (g.top_k, g.top_p, g.temperature) == (None, None, 0.7)
    assert g.num_tokens == 16 and generator("full_dp").num_tokens == 48 and g.conditioning == "class"


@pytest.mark.parametrize("cond, match", [
    (np.array([0, 10]), r"\[0, 9\]"),
    (np.array([[0, 1]]), r"\(N,\)"),
    (np.array([0.5, 1.0]), "int labels"),
])
def test_generate_rejects_bad_conditions(cond, match):
    with pytest.raises(ValueError, match=match):
        generation.generate(generator("bicubic"), cond, KEY)
    with pytest.raises(ValueError, match="num_samples"):
        generation.generate(generator("bicubic"), LABELS, KEY, num_samples=4)
