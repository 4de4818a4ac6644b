import numpy as np
import pytest

from dpwave.evaluate.images import as_images, as_labeled, check_labels

pytestmark = pytest.mark.unit


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
