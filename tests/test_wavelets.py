"""Wavelet layer: exactness against PyWavelets, invertibility, transforms, real images, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import pywt
import skimage.data

from dpwave import wavelets as wv

pytestmark = pytest.mark.unit

WAVELETS = ["haar", "db2", "db3", "sym4", "coif1"]


def _images(n=2, size=128, channels=3, seed=0):
    return np.random.RandomState(seed).rand(n, size, size, channels).astype(np.float32)


def _photo_batch(size=128):
    """Real textures: crops of scikit-image photos, NHWC float in [0, 1]."""
    photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]
    return np.stack([p[:size, :size, :3] for p in photos]).astype(np.float32) / 255.0


@pytest.mark.parametrize("wavelet", WAVELETS)
@pytest.mark.parametrize("levels", [1, 2, 3, 4])
def test_round_trip_with_and_without_jit(wavelet, levels):
    x = _photo_batch()
    rec = wv.reconstruct(wv.decompose(x, levels, wavelet))
    rec_jit = jax.jit(lambda a: wv.reconstruct(wv.decompose(a, levels, wavelet)))(x)
    assert rec.shape == x.shape
    assert float(jnp.max(jnp.abs(rec - x))) < 1e-5
    assert float(jnp.max(jnp.abs(rec_jit - x))) < 1e-5


@pytest.mark.parametrize("wavelet", WAVELETS + ["bior2.2", "rbio1.3"])
@pytest.mark.parametrize("mode", wv.SUPPORTED_MODES)
def test_matches_pywavelets(wavelet, mode):
    x = _images(size=64)
    levels = 2
    pyr = jax.jit(lambda a: wv.decompose(a, levels, wavelet, mode))(x)
    ref = pywt.wavedec2(np.moveaxis(x, -1, 1), wavelet, level=levels, mode=mode, axes=(-2, -1))
    np.testing.assert_allclose(pyr.coarse, np.moveaxis(ref[0], 1, -1), atol=2e-5)
    for ours, theirs in zip(pyr.details, ref[1:]):
        for a, b in zip(ours, theirs):
            np.testing.assert_allclose(a, np.moveaxis(b, 1, -1), atol=2e-5)


def test_haar_fast_path_matches_jaxwt():
    import jaxwt

    x = _photo_batch(64)
    ours = wv.decompose(x, 3, "haar")
    ref = jaxwt.wavedec2(jnp.moveaxis(x, -1, 1), pywt.Wavelet("haar"), level=3)
    np.testing.assert_allclose(ours.coarse, jnp.moveaxis(ref[0], 1, -1), rtol=1e-6, atol=1e-6)
    for ours_l, ref_l in zip(ours.details, ref[1:]):
        for a, b in zip(ours_l, ref_l):
            np.testing.assert_allclose(a, jnp.moveaxis(b, 1, -1), rtol=1e-6, atol=1e-6)


def test_haar_band_shapes_any_batch_and_channels():
    for n, c in [(1, 1), (5, 3), (2, 4)]:
        pyr = wv.decompose(_images(n, 32, c), 3)
        assert pyr.coarse.shape == (n, 4, 4, c)
        assert [b[0].shape for b in pyr.details] == [(n, 4, 4, c), (n, 8, 8, c), (n, 16, 16, c)]
        assert pyr.levels == 3


def test_vmap_and_grad():
    x = _images(3, 32, 1)
    per_example = jax.vmap(lambda im: wv.reconstruct(wv.decompose(im[None], 2, "db2"))[0])(x)
    np.testing.assert_allclose(per_example, x, atol=1e-5)
    # The transform is linear and orthogonal: d/dx 0.5*||W x||^2 = x (Haar: exact).
    grad = jax.grad(lambda a: 0.5 * sum(jnp.sum(b**2) for b in jax.tree.leaves(wv.decompose(a, 3))))(x)
    np.testing.assert_allclose(grad, x, atol=1e-5)


def test_jit_with_nonhaar_wavelet_keeps_shapes():
    """Under jit a wavelet longer than 4 taps (sym4: 8) must still pad by its own filter length, or the
    jitted coefficients would get other shapes than the eager ones (docs/design.md, "The data flow")."""
    x = _images(1, 64, 1)
    eager = wv.decompose(x, 2, "sym4")
    jitted = jax.jit(lambda a: wv.decompose(a, 2, "sym4"))(x)
    assert jax.tree.map(jnp.shape, eager) == jax.tree.map(jnp.shape, jitted)


def test_coarse_image_in_pixel_range_and_coarse_only():
    x = _photo_batch(64)
    coarse = wv.coarse_image(x, 3)
    assert coarse.shape == (3, 8, 8, 3)
    np.testing.assert_allclose(coarse, x.reshape(3, 8, 8, 8, 8, 3).mean(axis=(2, 4)), atol=1e-5)
    blurred = wv.reconstruct(wv.coarse_only(wv.decompose(x, 3)))
    np.testing.assert_allclose(blurred[:, :8, :8].mean(axis=(1, 2)), x[:, :8, :8].mean(axis=(1, 2)), atol=1e-5)
    up = wv.upsample_coarse(wv.decompose(x, 3).coarse, 3, (64, 64))
    assert up.shape == x.shape


def test_patches_round_trip_and_scale_order():
    pyr = wv.decompose(_images(2, 32, 1), 2)
    patches = pyr.to_patches([2, 2, 4])
    assert [p.shape for p in patches] == [(2, 16, 4), (2, 16, 12), (2, 16, 48)]
    again = pyr.from_patches(patches, [2, 2, 4])
    for a, b in zip(jax.tree.leaves(pyr), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="divisible by patch size"):
        pyr.to_patches([3, 2, 4])


def test_real_mnist_digits_energy_in_coarse_band():
    """On real digits most energy of the mean-removed image sits in the coarse + level-L bands."""
    from dpwave.data import mnist5k_arrays

    images, _ = mnist5k_arrays()
    x = images[:64].astype(np.float32) / 255.0
    pyr = wv.decompose(x, 2)
    rec = wv.reconstruct(pyr)
    assert float(jnp.max(jnp.abs(rec - x))) < 1e-5
    fine = sum(float(jnp.sum(b**2)) for b in pyr.details[-1])
    total = float(np.sum(x**2))
    assert 0.0 < fine / total < 0.5


@pytest.mark.parametrize(
    "images, levels, wavelet, mode, match",
    [
        (np.zeros((2, 32, 32), np.float32), 1, "haar", "symmetric", "rank 4"),
        (np.zeros((2, 32, 32, 1), np.uint8), 1, "haar", "symmetric", "floating point"),
        (np.zeros((2, 30, 32, 1), np.float32), 2, "haar", "symmetric", "not divisible by 2\\^levels"),
        (np.zeros((2, 32, 32, 1), np.float32), 0, "haar", "symmetric", "levels must be"),
        (np.zeros((2, 32, 32, 1), np.float32), 3, "db3", "symmetric", "beyond what"),
        (np.zeros((2, 32, 32, 1), np.float32), 1, "haar", "periodization", "unsupported wavelet boundary mode"),
        (np.zeros((2, 32, 32, 1), np.float32), 1, "db99", "symmetric", "unknown wavelet"),
    ],
)
def test_bad_input(images, levels, wavelet, mode, match):
    with pytest.raises(ValueError, match=match):
        wv.decompose(images, levels, wavelet, mode)


def test_wavelet_must_be_a_name():
    with pytest.raises(TypeError, match="PyWavelets name"):
        wv.decompose(_images(1, 32, 1), 1, pywt.Wavelet("db2"))


def test_max_levels():
    assert wv.max_levels(32, 32, "haar") == 5
    assert wv.max_levels(48, 64, "haar") == 4
    assert wv.max_levels(32, 32, "db3") == 2
