"""Official TFDS names through tfds.data_source's machinery, mocked (no TensorFlow, no download)."""
import numpy as np
import pytest
import tensorflow_datasets as tfds

from dpwave.data import DataError, DatasetNotPreparedError, DatasetSpec, load, loading

pytestmark = pytest.mark.integration


@pytest.fixture
def mocked_tfds(monkeypatch):
    # With TensorFlow present load() prepares unprepared datasets; the mock makes that a no-op.
    monkeypatch.setattr(loading, "tensorflow_available", lambda: True)
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        yield


def test_mnist_and_cifar10(mocked_tfds):
    mnist = load({"name": "mnist", "split": "train", "privacy": "public"})
    assert len(mnist) == 6 and mnist.privacy == "public"
    example = mnist[2]
    assert example["image"].shape == (28, 28, 1) and example["image"].dtype == np.uint8
    assert isinstance(example["label"], int) and 0 <= example["label"] < 10
    cifar = load(DatasetSpec("cifar10", "test", "private", resolution=16, channels=1))
    batch = cifar.get_batch([0, 5, 5])
    assert batch["image"].shape == (3, 16, 16, 1) and batch["image"].dtype == np.uint8
    np.testing.assert_array_equal(batch["image"][1], batch["image"][2])
    assert batch["label"].dtype == np.int32 and batch["id"].shape == (3,)
    assert all(isinstance(i, str) for i in batch["id"])


def test_celeb_a_non_square_needs_no_label(mocked_tfds):
    faces = load(DatasetSpec("celeb_a", "train", "public", resolution=32))
    batch = faces.get_batch([0, 1])
    assert batch["image"].shape == (2, 32, 32, 3)
    assert "label" not in batch


def test_unprepared_official_dataset_without_tensorflow(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "tensorflow_available", lambda: False)
    with pytest.raises(DatasetNotPreparedError, match=r"pip install -e \.\[prepare\]") as info:
        load(DatasetSpec("mnist", "train", "public", data_dir=str(tmp_path)))
    assert "mnist is not prepared in" in str(info.value)


def test_unknown_name():
    with pytest.raises(DataError, match=r"unknown dataset 'no_such_set_42'.*mnist5k"):
        load(DatasetSpec("no_such_set_42", "train", "public"))
