"""FD-lowpass scores shape, not texture: on real digits it ranks "right shapes, texture off" better than "right
texture, no shapes", the order FD-cls (the held-out classifier's features) gets backwards."""
import numpy as np
import pytest
from scipy import ndimage

from dpwave.evaluate.classifier import classifier_features
from dpwave.evaluate.frechet import frechet_distance
from dpwave.evaluate.lowpass import lowpass, lowpass_frechet_distance

pytestmark = pytest.mark.unit

TILE = 8


def scrambled(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each image cut into 8x8 tiles, reshuffled: the strokes' exact pixels and texture, no digit shape."""
    n, h, w, c = images.shape
    tiles = images.reshape(n, h // TILE, TILE, w // TILE, TILE, c).transpose(0, 1, 3, 2, 4, 5)
    tiles = tiles.reshape(n, -1, TILE, TILE, c)
    order = np.argsort(rng.random(tiles.shape[:2]), axis=1)
    tiles = np.take_along_axis(tiles, order[:, :, None, None, None], axis=1)
    return tiles.reshape(n, h // TILE, w // TILE, TILE, TILE, c).transpose(0, 1, 3, 2, 4, 5).reshape(images.shape)


def blurred(images: np.ndarray) -> np.ndarray:
    """Gaussian blur (sigma 1.5 pixels): the digit's shape, no stroke edges or texture."""
    return np.clip(ndimage.gaussian_filter(images.astype(np.float32), (0, 1.5, 1.5, 0)), 0, 255).astype(np.uint8)


def blocky(images: np.ndarray, block: int = 4) -> np.ndarray:
    """Each 4x4 block replaced by its mean: the shape, rendered in squares."""
    n, h, w, c = images.shape
    means = images.astype(np.float32).reshape(n, h // block, block, w // block, block, c).mean(axis=(2, 4))
    return np.repeat(np.repeat(means, block, axis=1), block, axis=2).round().astype(np.uint8)


def thickened(images: np.ndarray) -> np.ndarray:
    """Strokes dilated by one pixel (a 3x3 maximum filter): the shape in another stroke style."""
    return ndimage.grey_dilation(images, size=(1, 3, 3, 1))


@pytest.fixture(scope="module")
def variants(mnist):
    rng = np.random.default_rng(0)
    images = mnist["private"][0][rng.choice(len(mnist["private"][0]), 500, replace=False)]
    return {"real": images, "scrambled": scrambled(images, rng), "blurred": blurred(images),
            "blocky": blocky(images), "thickened": thickened(images)}


@pytest.fixture(scope="module")
def scores(mnist, heldout_classifier, variants):
    test = mnist["test"][0]
    test_feats = classifier_features(heldout_classifier, test)
    return {name: {"fd_cls": frechet_distance(classifier_features(heldout_classifier, x), test_feats),
                   "fd_lowpass": lowpass_frechet_distance(x, test)}
            for name, x in variants.items()}


def test_scrambling_keeps_every_pixel(variants):
    np.testing.assert_array_equal(np.sort(variants["scrambled"].reshape(500, -1), axis=1),
                                  np.sort(variants["real"].reshape(500, -1), axis=1))


def test_fd_cls_rewards_texture_over_shape(scores):
    # The failure FD-lowpass is for (measured: scrambled ~330, blurred ~710, blocky ~430).
    assert scores["scrambled"]["fd_cls"] < scores["blurred"]["fd_cls"]
    assert scores["scrambled"]["fd_cls"] < scores["blocky"]["fd_cls"]


@pytest.mark.parametrize("shape_right", ["blurred", "blocky", "thickened"])
def test_fd_lowpass_ranks_shape_over_texture(scores, shape_right):
    # Measured: real ~0.5, blocky ~0.5, blurred ~3.5, thickened ~4, scrambled ~77.
    assert scores["real"]["fd_lowpass"] < 1.0
    assert scores[shape_right]["fd_lowpass"] < scores["scrambled"]["fd_lowpass"] / 5


def test_lowpass_is_the_normalized_block_mean():
    x = np.zeros((2, 16, 16, 1), np.float32) - 1.0
    x[0, :8, :8] = 1.0  # ink in the top-left quarter
    x[1, 1:3, :] = 0.5  # a faint stripe: scaled up to unit RMS like any shape; a blank image stays zero
    low = lowpass(np.concatenate([x, -np.ones((1, 16, 16, 1), np.float32)]))
    assert low.shape == (3, 64)
    np.testing.assert_allclose(np.sqrt(np.mean(low[:2] ** 2, axis=1)), 1.0)
    np.testing.assert_allclose(low[:2].mean(axis=1), 0.0, atol=1e-12)
    top_left = low[0].reshape(8, 8)
    assert np.all(top_left[:4, :4] > 0) and np.all(top_left[4:, :] < 0)
    np.testing.assert_array_equal(low[2], 0.0)
    # An odd size is center-cropped to a multiple of 8: 18x18 keeps rows and columns 1..16.
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1.0)
    np.testing.assert_allclose(lowpass(padded), low[:2])
    with pytest.raises(ValueError, match="at least 8x8"):
        lowpass(np.zeros((2, 4, 4, 1), np.uint8))
