"""dpwave.validation: the shared input checks and their messages."""
import numpy as np
import pytest

from dpwave import validation

pytestmark = pytest.mark.unit


def test_float_images_maps_uint8_to_unit_range_and_floats_pass_through():
    x = np.array([0, 255, 51], np.uint8).reshape(1, 1, 3, 1)
    np.testing.assert_allclose(validation.float_images(x).ravel(), [-1.0, 1.0, 51 / 127.5 - 1.0], rtol=1e-6)
    f = np.linspace(-1, 1, 12).reshape(1, 2, 2, 3)
    out = validation.float_images(f)
    assert out.dtype == np.float32 and np.allclose(out, f)


@pytest.mark.parametrize("images, match", [
    (np.zeros((32, 32), np.uint8), "NHWC"),
    (np.zeros((0, 4, 4, 1), np.uint8), "empty"),
    (np.zeros((1, 4, 4, 1), np.int64), "dtype int64"),
    (np.full((1, 4, 4, 1), np.nan, np.float32), r"images contains NaN or inf \(16 values\)"),
    (np.full((1, 4, 4, 1), 1.5, np.float32), r"\[-1, 1\]"),
])
def test_float_images_rejects_bad_images(images, match):
    with pytest.raises(ValueError, match=match):
        validation.float_images(images)


def test_integer_checks():
    assert validation.is_int(3) and validation.is_int(np.int64(3))
    assert not validation.is_int(True) and not validation.is_int(3.0)
    validation.check_int("steps", 1, 1)
    for bad in (0, True, 2.0, "2"):
        with pytest.raises(ValueError, match="steps must be an int >= 1, got"):
            validation.check_int("steps", bad, 1)


def test_sizes_must_halve_levels_times():
    validation.check_divisible_by_levels(32, 16, 4)
    with pytest.raises(ValueError, match=r"image size 30x32 is not divisible by 2\^levels = 4"):
        validation.check_divisible_by_levels(30, 32, 2)


def test_image_arrays():
    assert validation.single_image(np.zeros((4, 5, 3), np.uint8), "PNG array").shape == (4, 5, 3)
    with pytest.raises(ValueError, match="PNG array must be uint8, got float64"):
        validation.single_image(np.zeros((4, 5)), "PNG array")
    with pytest.raises(ValueError, match=r"image must be \(H, W\)"):
        validation.single_image(np.zeros((4, 5, 2), np.uint8), "image")
    with pytest.raises(ValueError, match="finite"):
        validation.check_finite(np.array([1.0, np.inf]), "finite")
