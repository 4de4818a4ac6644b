"""What every dpwave TFDS builder shares: array_record output, generation order, layout errors."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from dpwave import files
from dpwave.data.errors import DatasetLayoutError

FILE_FORMAT = "array_record"


@dataclasses.dataclass(eq=False)
class ResolutionConfig(tfds.core.BuilderConfig):
    """A build config that fixes the stored square resolution."""

    resolution: int = 64


def resolution_configs(*resolutions: int, what: str) -> list[ResolutionConfig]:
    """One ``<r>px`` config per resolution; the first is the default."""
    return [ResolutionConfig(name=f"{r}px", resolution=r, description=f"{what} at {r}x{r}")
            for r in resolutions]


def make_layout_error(name: str, root: Any, problem: str, layout: str, source: str
                      ) -> DatasetLayoutError:
    """A ``DatasetLayoutError`` naming the problem, the manual dir, the expected layout and the source."""
    return DatasetLayoutError(
        f"{name}: {problem}\nmanual dir: {root}\nexpected layout:\n{layout}\nget the data: {source}")


class DpwaveBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base builder: writes array_record (never parquet) in generation order.

    Subclasses set ``LAYOUT`` (the expected manual-dir tree) and ``SOURCE`` (where to get the data),
    ``SPLITS`` (every split they generate: ``all`` and split expressions resolve against them before
    anything is built), ``PRIVATE_SPLITS`` for splits that hold private data whatever the spec says, and
    ``PRIVATE_BY_DEFAULT`` for splits a spec may tag public only with ``override_private_default``.
    """

    LAYOUT: ClassVar[str] = ""
    SOURCE: ClassVar[str] = ""
    SPLITS: ClassVar[tuple[str, ...]] = ()
    PRIVATE_SPLITS: ClassVar[tuple[str, ...]] = ()
    PRIVATE_BY_DEFAULT: ClassVar[tuple[str, ...]] = ()

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
        """No checksums file: these builders download nothing. (TFDS' default probes the package with
        ``importlib_resources``, which tensorflow-datasets 4.9.10 uses but does not install.)"""
        return None

    def __init__(self, *, file_format: str | None = None, **kwargs: Any):
        if file_format not in (None, FILE_FORMAT):
            raise ValueError(f"file_format={file_format!r}: dpwave builders write only {FILE_FORMAT!r} "
                             "(random access without TensorFlow; tfds' parquet writer drops examples)")
        super().__init__(file_format=FILE_FORMAT, **kwargs)

    @classmethod
    def config_for(cls, resolution: int | None, channels: int | None, manual_dir: str | None
                   ) -> str | tfds.core.BuilderConfig | None:
        """The build config serving a spec: ``<r>px`` for ``resolution`` (made on the fly when not
        predefined), or None (the default config; the source resizes at read time)."""
        del channels, manual_dir  # stored as 3-channel; converted at read time
        if not cls.BUILDER_CONFIGS or resolution is None:
            return None
        name = f"{resolution}px"
        if any(c.name == name for c in cls.BUILDER_CONFIGS):
            return name
        return ResolutionConfig(name=name, resolution=resolution, description=f"{resolution}x{resolution}")

    @classmethod
    def declared_splits(cls, config: str | tfds.core.BuilderConfig | None) -> tuple[str, ...]:
        """The splits the build config ``config`` (from ``config_for``) generates."""
        del config  # the same for every config unless a subclass says otherwise
        return cls.SPLITS

    @classmethod
    def layout_error(cls, root: Any, problem: str) -> DatasetLayoutError:
        """A ``DatasetLayoutError`` that states the problem, the expected layout and the data source."""
        return make_layout_error(cls.name, root, problem, cls.LAYOUT, cls.SOURCE)

    def manual_root(self, dl_manager: tfds.download.DownloadManager) -> str:
        """The manual directory, or a ``DatasetLayoutError`` when it is missing or empty."""
        try:
            return os.fspath(dl_manager.manual_dir)
        except AssertionError:
            raise self.layout_error(
                dl_manager._manual_dir,  # pylint: disable=protected-access
                "the manual directory does not exist or is empty (pass DatasetSpec.manual_dir)") from None

    def require_paths(self, root: str, relpaths: list[str]) -> None:
        """Raises a layout error naming every required path missing under ``root``."""
        missing = [p for p in relpaths if not files.exists(os.path.join(root, p))]
        if missing:
            raise self.layout_error(root, f"missing {missing}")


class CaptionedImages(DpwaveBuilder, skip_registration=True):
    """Base of the captioned image datasets: features ``image`` (R x R x 3 for the ``<R>px`` config),
    ``captions`` (all captions of the image) and ``id``, in generation order."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    def _info(self) -> tfds.core.DatasetInfo:
        r = self.builder_config.resolution
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(r, r, 3)),
                "captions": tfds.features.Sequence(tfds.features.Text()),
                "id": tfds.features.Text(),
            }),
            disable_shuffling=True,
        )


def to_pil(image: np.ndarray) -> Image.Image:
    """A PIL image for tfds' Image feature (which PNG-encodes it without TensorFlow)."""
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
