import numpy as np
import pytest

from dpwave.evaluate.images import as_images, as_labeled, check_labels, to_float


def test_uint8_maps_to_unit_range_and_floats_pass_through():
    x = np.array([0, 255, 51], np.uint8).reshape(1, 1, 3, 1)
    np.testing.assert_allclose(to_float(x).ravel(), [-1.0, 1.0, 51 / 127.5 - 1.0], rtol=1e-6)
    f = np.linspace(-1, 1, 12).reshape(1, 2, 2, 3)
    out = to_float(f)
    assert out.dtype == np.float32 and np.allclose(out, f)


@pytest.mark.parametrize("images, match", [
    (np.zeros((32, 32), np.uint8), "NHWC"),
    (np.zeros((0, 4, 4, 1), np.uint8), "empty"),
    (np.zeros((1, 4, 4, 1), np.int64), "dtype int64"),
    (np.full((1, 4, 4, 1), np.nan, np.float32), "NaN"),
    (np.full((1, 4, 4, 1), 1.5, np.float32), r"\[-1, 1\]"),
])
def test_to_float_rejects_bad_images(images, match):
    with pytest.raises(ValueError, match=match):
        to_float(images)


def test_labels_and_containers():
    images, labels = np.zeros((3, 4, 4, 1), np.uint8), np.array([0, 2, 1])
    for data in ((images, labels), {"image": images, "label": labels}):
        x, y = as_labeled(data, name="real_test")
        assert x.shape == images.shape and y.dtype == np.int32 and list(y) == [0, 2, 1]
        assert as_images(data, name="private").shape == images.shape
    assert as_images(images, name="private").shape == images.shape
    with pytest.raises(ValueError, match="keys 'image' and 'label'"):
        as_labeled({"image": images}, name="real_test")
    with pytest.raises(ValueError, match="must be \\(images, labels\\)"):
        as_labeled(images, name="real_test")
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        check_labels(labels[:2], 3)
    with pytest.raises(ValueError, match=">= 0"):
        check_labels(np.array([0, -1, 2]), 3)
    with pytest.raises(ValueError, match="integers"):
        check_labels(np.array([0.0, 1.0, 2.0]), 3)
