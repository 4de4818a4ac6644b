"""``Source``: random access to one split as numpy examples, with the spec's privacy tag attached."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from dpwave.data.errors import DataError
from dpwave.data.images import center_crop_resize, set_channels
from dpwave.data.spec import DatasetSpec, Privacy


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _column(values: list[Any]) -> np.ndarray:
    out = np.empty(len(values), object)
    out[:] = values
    return out


class Source(Sequence):
    """One split of a dataset: ``source[i]`` is an example dict, ``get_batch`` stacks many.

    Examples hold ``image`` (uint8 HWC, resized/converted as the spec asks) and, when the dataset has
    them, ``label`` (int), ``caption`` (the first caption), ``captions`` (all of them) and ``id``.
    """

    def __init__(self, data: Sequence[Any], spec: DatasetSpec, feature_names: Sequence[str]):
        """Wraps a TFDS data source (``tfds.data_source`` / ``builder.as_data_source``)."""
        self._data = data
        self._spec = spec
        self._fields = [f for f in ("label", "captions", "id") if f in feature_names]
        self._index = self._label_filter() if spec.labels is not None else None
        self._cache: dict[str, np.ndarray] | None = None
        if spec.in_memory:
            examples = [self._convert(self._record(i)) for i in range(len(self))]
            self._cache = self._stack(examples)
            if "captions" in self._fields:
                self._cache["captions"] = _column([e["captions"] for e in examples])

    @property
    def spec(self) -> DatasetSpec:
        return self._spec

    @property
    def privacy(self) -> Privacy:
        return self._spec.privacy

    @property
    def data_files(self) -> list[tuple[str, int, int]] | None:
        """``(path, skip, take)`` of every file the split reads (a cache key of its content), or None
        when the data is not a prepared TFDS dataset."""
        info, split = getattr(self._data, "dataset_info", None), getattr(self._data, "split", None)
        if info is None or split is None:
            return None
        return [(f.filename, f.skip, f.take) for f in info.splits[split].file_instructions]

    def __len__(self) -> int:
        return len(self._data) if self._index is None else len(self._index)

    def _record(self, i: int) -> dict[str, Any]:
        """Raw record ``i`` of this (possibly label-filtered) split.

        Raises:
          DataError: one line naming the example and its data file, when the record cannot be read or decoded.
        """
        position = i if self._index is None else int(self._index[i])
        try:
            return self._data[position]
        except (OSError, RuntimeError, ValueError) as e:
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DataError(f"{self._spec.label}: cannot read example {i} from {self._file_of(position)}: {why}; "
                            "delete that prepared dataset directory and load again to rebuild it") from e

    def _file_of(self, position: int) -> str:
        """The data file holding record ``position`` of the split (or the dataset's name when not file-backed)."""
        for path, _, take in self.data_files or ():
            if position < take:
                return path
            position -= take
        return self._spec.label

    def _label_filter(self) -> np.ndarray:
        """Positions in the split of the examples whose label is in ``spec.labels``."""
        if "label" not in self._fields:
            raise DataError(f"{self._spec.label} has no 'label' feature; remove DatasetSpec.labels")
        labels = np.array([int(self._data[i]["label"]) for i in range(len(self._data))])
        index = np.flatnonzero(np.isin(labels, self._spec.labels))
        if not index.size:
            raise DataError(f"{self._spec.label} has no example with a label in {list(self._spec.labels)} "
                            f"(its labels: {sorted(set(labels.tolist()))})")
        return index

    def __repr__(self) -> str:
        return f"Source({self._spec.label}, privacy={self.privacy}, {len(self)} examples)"

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        n = len(self)
        if not -n <= int(index) < n:
            raise IndexError(f"index {index} out of range for {self._spec.label} ({n} examples)")
        i = int(index) % n
        if self._cache is not None:
            example = {k: v[i] for k, v in self._cache.items()}
            if "label" in example:
                example["label"] = int(example["label"])
            if "captions" in example:
                example["captions"] = list(example["captions"])
            return example
        return self._convert(self._record(i))

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """Stacked examples: ``image`` (B, H, W, C) uint8, ``label`` (B,) int32, ``caption`` and
        ``id`` (B,) object arrays of str. (All captions of an example: ``source[i]["captions"]``.)"""
        idx = np.asarray(indices)
        if idx.ndim != 1 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"indices must be a non-empty 1-D integer array, got shape {idx.shape} "
                             f"dtype {idx.dtype}")
        if idx.min() < 0 or idx.max() >= len(self):
            raise IndexError(f"indices span [{idx.min()}, {idx.max()}], outside [0, {len(self)}) of "
                             f"{self._spec.label}")
        if self._cache is not None:
            return {k: v[idx] for k, v in self._cache.items() if k != "captions"}
        return self._stack([self._convert(self._record(int(i))) for i in idx])

    def _convert(self, record: dict[str, Any]) -> dict[str, Any]:
        image = np.asarray(record["image"])
        if self._spec.channels is not None:
            image = set_channels(image, self._spec.channels)
        if self._spec.resolution is not None and image.shape[:2] != (self._spec.resolution,) * 2:
            image = center_crop_resize(image, self._spec.resolution)
        out: dict[str, Any] = {"image": image}
        if "label" in self._fields:
            out["label"] = int(record["label"])
        if "captions" in self._fields:
            out["captions"] = [_text(c) for c in record["captions"]]
            out["caption"] = out["captions"][0] if out["captions"] else ""
        if "id" in self._fields:
            out["id"] = _text(record["id"])
        return out

    def _stack(self, examples: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        shapes = {e["image"].shape for e in examples}
        if len(shapes) > 1:
            raise ValueError(f"{self._spec.label} has images of several shapes {sorted(shapes)[:4]}; set "
                             "DatasetSpec.resolution to resize them to one square size")
        out = {"image": np.stack([e["image"] for e in examples])}
        if "label" in self._fields:
            out["label"] = np.array([e["label"] for e in examples], np.int32)
        for key in ("caption", "id"):
            if key in examples[0]:
                out[key] = _column([e[key] for e in examples])
        return out
