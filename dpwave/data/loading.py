"""``load(spec) -> Source``: dpwave's builders (built on first use) or any prepared TFDS dataset."""
from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import tensorflow_datasets as tfds

from dpwave.data.boundary import check_split_tag
from dpwave.data.builders import BUILDERS
from dpwave.data.errors import DataError, DatasetNotPreparedError
from dpwave.data.source import Source
from dpwave.data.spec import DatasetSpec

if TYPE_CHECKING:
    import ml_collections

_ARRAY_RECORD = tfds.core.file_adapters.FileFormat.ARRAY_RECORD


def tensorflow_available() -> bool:
    """Whether TensorFlow is importable (needed only to *prepare* official TFDS datasets)."""
    return importlib.util.find_spec("tensorflow") is not None


def _download_config(spec: DatasetSpec) -> tfds.download.DownloadConfig:
    return tfds.download.DownloadConfig(manual_dir=spec.manual_dir, try_download_gcs=False)


def _dpwave_builder(spec: DatasetSpec, role: str | None) -> tfds.core.DatasetBuilder:
    """One of dpwave's builders, built into ``data_dir`` unless already there (idempotent), once the split
    expression has passed the privacy boundary against the splits the builder declares."""
    cls = BUILDERS[spec.name]
    config = cls.config_for(spec.resolution, spec.channels, spec.manual_dir)
    declared = cls.declared_splits(config)
    check_split_tag(spec, declared, cls.PRIVATE_SPLITS, cls.PRIVATE_BY_DEFAULT, role)
    builder = cls(config=config, data_dir=spec.data_dir)
    if not builder.is_prepared():
        builder.download_and_prepare(download_config=_download_config(spec))
    undeclared = sorted(set(builder.info.splits) - set(declared))
    if undeclared:  # 'all' would read them unchecked
        raise DataError(f"{spec.name} at {builder.data_dir} has split(s) {undeclared} that its builder does not "
                        f"declare ({list(declared)}); delete that prepared dataset directory and load again")
    return builder


def _official_builder(spec: DatasetSpec) -> tfds.core.DatasetBuilder:
    """A TFDS catalog dataset, read as array_record; preparing it needs TensorFlow."""
    try:
        builder = tfds.builder(spec.name, data_dir=spec.data_dir, file_format=_ARRAY_RECORD.value)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(f"unknown dataset {spec.name!r}: use one of dpwave's builders "
                        f"{sorted(BUILDERS)} or a TFDS catalog name (tfds.list_builders())") from None
    if builder.is_prepared():
        if builder.info.file_format != _ARRAY_RECORD:
            raise DatasetNotPreparedError(
                f"{spec.name} is prepared at {builder.data_dir} as {builder.info.file_format.value}; "
                f"random access needs array_record: run `tfds build {spec.name} "
                "--file_format=array_record` (with TensorFlow) into another data_dir")
        return builder
    if not tensorflow_available():
        raise DatasetNotPreparedError(
            f"{spec.name} is not prepared in {builder.data_dir} and preparing official TFDS datasets "
            "needs TensorFlow: `pip install -e .[prepare]` (then load again, or run `tfds build "
            f"{spec.name} --file_format=array_record`), or point data_dir at a prepared copy")
    builder.download_and_prepare(file_format=_ARRAY_RECORD.value,
                                 download_config=_download_config(spec))
    return builder


def load(spec: DatasetSpec | Mapping[str, Any] | ml_collections.ConfigDict, role: str | None = None) -> Source:
    """Returns the split ``spec`` names, building dpwave's datasets on first use.

    Args:
      spec: a ``DatasetSpec``, or a dict / ``ConfigDict`` for ``DatasetSpec.from_config``.
      role: where the spec comes from (``config.data.public``), for error messages.

    Raises:
      SplitExpressionError: the split expression does not parse or names a split the dataset lacks.
      PrivateSplitError: the split expression reads a split its builder declares private (always, or by
        default without ``override_private_default``) and the spec tags it public.
      DatasetLayoutError: a manual dir is missing or malformed (the message shows the layout).
      DatasetNotPreparedError: an official dataset is not prepared and TensorFlow is missing.
      DataError: unknown name, or the split is empty.
    """
    if not isinstance(spec, DatasetSpec):
        spec = DatasetSpec.from_config(spec)
    if spec.name in BUILDERS:
        builder = _dpwave_builder(spec, role)
    else:
        builder = _official_builder(spec)
        if builder.info.splits:  # known once prepared; official datasets declare no private split
            check_split_tag(spec, list(builder.info.splits), role=role)
    # Split sizes are known once prepared (only tfds' test mocks serve unprepared builders).
    if builder.is_prepared() and builder.info.splits[spec.split].num_examples == 0:
        raise DataError(f"{spec.label} has no examples; choose a non-empty split")
    data = builder.as_data_source(split=spec.split)
    features = builder.info.features
    if "image" not in features:
        raise DataError(f"{spec.name} has no 'image' feature (features: {sorted(features)})")
    return Source(data, spec, list(features))
