"""``image_folder``: any folder of images (class subfolders or flat with captions) as a TFDS dataset."""
from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import tensorflow_datasets as tfds

from dpwave.data.builders import folder_scan
from dpwave.data.builders.base import DpwaveBuilder, ResolutionConfig, to_pil
from dpwave.data.errors import DataError
from dpwave.data.images import prepare_image, read_image_file


@dataclasses.dataclass(eq=False)
class ImageFolderConfig(ResolutionConfig):
    """Resolution, channels and what the scan found (it decides the features and the splits)."""

    channels: int = 3
    splits: tuple[str, ...] = ()
    class_names: tuple[str, ...] = ()
    captioned: bool = False
    fingerprint: str = ""


def image_folder_config(root: str, resolution: int, channels: int = 3) -> ImageFolderConfig:
    """Scans ``root`` and names a config after the folder, the size and the content fingerprint.

    A changed folder gets a new name, so it is rebuilt rather than read stale.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels={channels!r}: image_folder stores 1 or 3 channels")
    scan = folder_scan.scan_folder(root)
    slug = re.sub(r"[^a-z0-9]+", "_", os.path.basename(os.path.abspath(root)).lower()).strip("_")
    return ImageFolderConfig(
        name=f"{slug or 'root'}_{resolution}px_{channels}ch_{scan.fingerprint}",
        description=f"{os.path.abspath(root)} at {resolution}x{resolution}x{channels}",
        resolution=resolution, channels=channels, splits=tuple(scan.splits), class_names=scan.class_names,
        captioned=scan.captioned, fingerprint=scan.fingerprint)


def carve(scan: folder_scan.FolderScan, fractions: Mapping[str, float], split: str = "train") -> dict[str, str]:
    """Carves split ``split`` of a scanned folder into disjoint parts, as TFDS split expressions over it.

    Class by class (the whole split when it has no classes), the images in path order are cut into
    ``public`` first, then one part per entry of ``fractions`` (role -> fraction of the class, at least one
    image each; counts are rounded) in its order: e.g. ``{"heldout": 0.15, "test": 0.15}`` on 20 cats and
    10 dogs gives ``public`` ``train[0:14]+train[20:26]``, ``heldout`` ``train[14:17]+train[26:28]`` and
    ``test`` ``train[17:20]+train[28:30]``. Deterministic: the same folder always gives the same parts, and the
    parts read the one prepared split, so they keep its privacy default (private unless a spec overrides it).

    Raises:
      DataError: a class too small to keep an image in every part.
    """
    entries = scan.splits[split]
    groups: dict[int | None, list[int]] = {}
    for position, entry in enumerate(entries):
        groups.setdefault(entry.label, []).append(position)
    parts: dict[str, list[int]] = {role: [] for role in ("public", *fractions)}
    for label, positions in groups.items():
        counts = {role: max(1, round(fraction * len(positions))) for role, fraction in fractions.items()}
        rest = len(positions) - sum(counts.values())
        if rest < 1:
            what = f"class {scan.class_names[label]!r}" if label is not None else f"split {split!r}"
            raise DataError(f"{what} has {len(positions)} images, too few to carve {dict(fractions)} from it and "
                            "keep one for the public role")
        start = 0
        for role, count in {"public": rest, **counts}.items():
            parts[role] += positions[start:start + count]
            start += count
    return {role: _expression(split, positions) for role, positions in parts.items()}


def _expression(split: str, positions: list[int]) -> str:
    """``train[a:b]+train[c:d]`` covering ``positions``, one slice per run of consecutive ones."""
    runs: list[list[int]] = []
    for position in sorted(positions):
        if runs and runs[-1][1] == position:
            runs[-1][1] += 1
        else:
            runs.append([position, position + 1])
    return "+".join(f"{split}[{a}:{b}]" for a, b in runs)


class ImageFolder(DpwaveBuilder, skip_registration=True):
    """A folder of images: splits from ``train/``/``test/`` (else one ``train`` split).

    Features: ``image`` (R x R x C, center-cropped and resized), ``id`` (path relative to the root),
    plus ``label`` (class subfolders) or ``captions`` (flat folder with ``captions.jsonl``).
    Build it with ``config=image_folder_config(root, resolution, channels)`` and ``root`` as the
    manual dir. Examples are stored sorted by path.

    A folder has no inherent public split: both splits are private by default, and a spec tags one
    public only with ``DatasetSpec.override_private_default`` (the operator asserts the folder is
    public data, e.g. FFHQ or CC3M in the paper configs).
    """

    name = "image_folder"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    LAYOUT = folder_scan.LAYOUT
    SOURCE = folder_scan.SOURCE
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Point the manual dir at the folder:\n{LAYOUT}"
    SPLITS = folder_scan.SPLIT_FOLDERS
    PRIVATE_BY_DEFAULT = folder_scan.SPLIT_FOLDERS

    @classmethod
    def declared_splits(cls, config: str | tfds.core.BuilderConfig | None) -> tuple[str, ...]:
        """The split folders the scan found (``train``, and ``test`` when there is one)."""
        return config.splits if isinstance(config, ImageFolderConfig) and config.splits else cls.SPLITS

    @classmethod
    def config_for(cls, resolution: int | None, channels: int | None, manual_dir: str | None
                   ) -> ImageFolderConfig:
        """Scans ``manual_dir`` (the folder) into a config; both it and ``resolution`` are required."""
        if manual_dir is None or resolution is None:
            raise DataError(f"image_folder needs manual_dir (the folder) and resolution; got "
                            f"manual_dir={manual_dir!r}, resolution={resolution!r}")
        return image_folder_config(manual_dir, resolution, channels or 3)

    def _info(self) -> tfds.core.DatasetInfo:
        config = self.builder_config
        if not isinstance(config, ImageFolderConfig):
            raise ValueError("image_folder needs config=image_folder_config(root, resolution, channels)")
        r, c = config.resolution, config.channels
        features: dict[str, Any] = {"image": tfds.features.Image(shape=(r, r, c)),
                                    "id": tfds.features.Text()}
        if config.class_names:
            features["label"] = tfds.features.ClassLabel(names=list(config.class_names))
        if config.captioned:
            features["captions"] = tfds.features.Sequence(tfds.features.Text())
        return tfds.core.DatasetInfo(builder=self, description=self.__doc__,
                                     features=tfds.features.FeaturesDict(features),
                                     disable_shuffling=True)

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        root = self.manual_root(dl_manager)
        scan = folder_scan.scan_folder(root)
        if scan.fingerprint != self.builder_config.fingerprint:
            raise self.layout_error(root, "the folder changed after its config was made; rebuild the "
                                    "config with image_folder_config()")
        return {split: self._generate_examples(root, entries) for split, entries in scan.splits.items()}

    def _generate_examples(self, root: str, entries: list[folder_scan.Entry]
                           ) -> Iterator[tuple[str, dict[str, Any]]]:
        config = self.builder_config
        for entry in entries:
            pixels = read_image_file(os.path.join(root, entry.relpath), entry.relpath)
            example: dict[str, Any] = {
                "image": to_pil(prepare_image(pixels, entry.relpath, config.resolution,
                                              config.channels)),
                "id": entry.relpath,
            }
            if config.class_names:
                example["label"] = entry.label
            if config.captioned:
                example["captions"] = list(entry.captions)
            yield entry.relpath, example
