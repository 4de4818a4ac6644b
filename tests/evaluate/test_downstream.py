import numpy as np
import pytest

from dpwave.evaluate import downstream
from dpwave.evaluate.classifier import TrainConfig
from dpwave.evaluate.downstream import downstream_accuracy, split_synthetic

pytestmark = pytest.mark.unit

CONFIG = TrainConfig(epochs=6, seed=0)


class RecordingArray:
    """Array stand-in that logs every conversion to a numpy array."""

    def __init__(self, array, log):
        self.array, self.log = array, log

    def __len__(self):
        return len(self.array)

    def __array__(self, dtype=None, copy=None):
        self.log.append("real_test read")
        return self.array if dtype is None else self.array.astype(dtype)


@pytest.fixture(scope="module")
def synthetic(mnist):
    # Real public digits stand in for labeled synthetic samples.
    images, labels = mnist["public"]
    idx = np.random.default_rng(0).choice(len(images), 600, replace=False)
    return images[idx], labels[idx]


@pytest.fixture(scope="module")
def recorded_run(mnist, synthetic):
    log = []
    original = downstream.train_classifier

    def logged_train(*args, **kwargs):
        result = original(*args, **kwargs)
        log.append("selection done")
        return result

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(downstream, "train_classifier", logged_train)
        test_images, test_labels = mnist["test"]
        result = downstream_accuracy(*synthetic, (RecordingArray(test_images, log), test_labels),
                                     num_classes=10, config=CONFIG)
    return result, log


def test_trains_on_synthetic_and_scores_real_test(recorded_run):
    result, _ = recorded_run
    assert result.num_train == 540 and result.num_val == 60
    assert result.test_accuracy > 0.8
    accs = [h["val_accuracy"] for h in result.history]
    assert result.best_epoch == 1 + int(np.argmax(accs)) and result.val_accuracy == max(accs)


def test_real_test_is_read_once_and_only_after_selection(recorded_run):
    _, log = recorded_run
    assert log == ["selection done", "real_test read"]


def test_selection_does_not_depend_on_the_test_set(mnist, synthetic, recorded_run):
    result, _ = recorded_run
    test_images, test_labels = mnist["test"]
    scrambled = (255 - test_images, np.random.default_rng(0).permutation(test_labels))
    other = downstream_accuracy(*synthetic, scrambled, num_classes=10, config=CONFIG)
    assert other.history == result.history and other.best_epoch == result.best_epoch
    assert other.test_accuracy < 0.5 < result.test_accuracy


def test_synthetic_split_is_seeded_disjoint_and_complete():
    train, val = split_synthetic(100, 0.1, seed=0)
    assert len(val) == 10 and np.array_equal(np.sort(np.concatenate([train, val])), np.arange(100))
    assert np.array_equal(split_synthetic(100, 0.1, seed=0)[1], val)
    assert not np.array_equal(split_synthetic(100, 0.1, seed=1)[1], val)
    with pytest.raises(ValueError, match="cannot be split"):
        split_synthetic(3, 0.1, seed=0)
    with pytest.raises(ValueError, match="val_fraction"):
        split_synthetic(100, 1.5, seed=0)


def test_bad_labels_raise(synthetic, mnist):
    images, labels = synthetic
    with pytest.raises(ValueError, match="synthetic labels must have shape"):
        downstream_accuracy(images, labels[:-1], mnist["test"], num_classes=10)
