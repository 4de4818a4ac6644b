"""Pixel validation and image transforms."""
import numpy as np
import pytest
from PIL import Image

from dpwave.data import InvalidExampleError, to_float, to_uint8
from dpwave.data.images import (as_uint8_pixels, center_crop_resize, prepare_image,
                                read_image_file, set_channels)

pytestmark = pytest.mark.unit


def test_as_uint8_accepts_uint8_int_and_unit_float():
    ramp = np.arange(256, dtype=np.int64).reshape(16, 16)
    out = as_uint8_pixels(ramp, "ramp")
    assert out.shape == (16, 16, 1) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 0], ramp)
    floats = as_uint8_pixels(np.array([[0.0, 0.5, 1.0]]), "f")
    np.testing.assert_array_equal(floats[0, :, 0], [0, 128, 255])


@pytest.mark.parametrize("bad, match", [
    (np.array([[0.2, np.nan]], np.float32), "1 pixel values are NaN or inf"),
    (np.array([[np.inf, 0.0]]), "NaN or inf"),
    (np.array([[0.0, 1.5]]), r"float pixels span \[0.0, 1.5\]"),
    (np.array([[0, 300]]), r"integer pixels span \[0, 300\]"),
    (np.zeros((4, 4, 5), np.uint8), r"shape \(4, 4, 5\)"),
    (np.zeros((2, 4, 4, 3), np.uint8), r"shape \(2, 4, 4, 3\)"),
    (np.zeros((0, 4), np.uint8), r"shape \(0, 4, 1\)"),
])
def test_as_uint8_refuses_bad_pixels_naming_the_example(bad, match):
    with pytest.raises(InvalidExampleError, match=match) as info:
        as_uint8_pixels(bad, "img-17")
    assert "img-17" in str(info.value)


def test_set_channels():
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[..., 0] = 255
    gray = set_channels(rgb, 1)
    assert gray.shape == (2, 2, 1)
    assert int(gray[0, 0, 0]) == round(0.299 * 255)  # ITU-R 601 luma, as PIL's convert("L")
    np.testing.assert_array_equal(set_channels(gray, 3), np.repeat(gray, 3, -1))
    rgba = np.concatenate([rgb, np.full((2, 2, 1), 7, np.uint8)], -1)
    np.testing.assert_array_equal(set_channels(rgba, 3), rgb)
    with pytest.raises(ValueError, match="channels=2"):
        set_channels(rgb, 2)


def test_center_crop_resize_crops_the_center_square():
    image = np.zeros((10, 30, 1), np.uint8)
    image[:, 10:20] = 200  # the center square, the sides stay black
    out = center_crop_resize(image, 10)
    assert out.shape == (10, 10, 1)
    assert np.all(out == 200)
    small = center_crop_resize(np.full((10, 30, 3), 9, np.uint8), 4)
    assert small.shape == (4, 4, 3) and np.all(small == 9)


def test_prepare_image_and_read_float_tiff(tmp_path):
    pixels = np.full((6, 8), 0.25, np.float32)
    Image.fromarray(pixels).save(tmp_path / "ok.tif")
    out = prepare_image(read_image_file(tmp_path / "ok.tif", "ok"), "ok", 4, 3)
    assert out.shape == (4, 4, 3) and np.all(out == 64)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(InvalidExampleError, match="'broken'.*cannot decode"):
        read_image_file(tmp_path / "broken.png", "broken")


def test_to_float_and_back():
    images = np.array([0, 1, 127, 128, 255], np.uint8)
    floats = to_float(images)
    assert floats.dtype == np.float32
    assert floats.min() == -1.0 and floats.max() == 1.0
    np.testing.assert_array_equal(to_uint8(floats), images)
    np.testing.assert_array_equal(to_uint8(np.array([-3.0, 3.0])), [0, 255])
    with pytest.raises(ValueError, match="uint8"):
        to_float(floats)
