"""``mm_celeba_hq``: CelebA-HQ faces with 10 captions each (the MM-CelebA-HQ release)."""
from __future__ import annotations

import io
import os
import pickle
from collections.abc import Iterator
from typing import Any

import tensorflow_datasets as tfds

from dpwave import files
from dpwave.data.builders.base import CaptionedImages, resolution_configs, to_pil
from dpwave.data.errors import InvalidExampleError
from dpwave.data.images import prepare_image, read_image_file

LAYOUT = """\
  CelebA-HQ-img/<id>.jpg        30,000 CelebA-HQ images (1024x1024)
  celeba-caption/<id>.txt       captions of image <id>, one per line (10 per image)
  train/filenames.pickle        pickled list of training ids (24,000)
  test/filenames.pickle         pickled list of test ids (6,000)"""
SOURCE = "https://github.com/IIGROUP/MM-CelebA-HQ-Dataset (images, text, train/test filenames)"
SPLITS = ("train", "test")


class _ListUnpickler(pickle.Unpickler):
    """Unpickles plain data only: a filenames pickle must never run code."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: expected a list of ids")


def read_ids(path: str) -> list[str]:
    """Ids from a filenames pickle (str or int entries; a trailing ``.jpg`` is dropped)."""
    ids = _ListUnpickler(io.BytesIO(files.read_bytes(path)), encoding="latin1").load()
    if not isinstance(ids, (list, tuple)):
        raise ValueError(f"expected a list of ids, got {type(ids).__name__}")
    out = []
    for item in ids:
        if isinstance(item, bytes):
            item = item.decode()
        if not isinstance(item, (str, int)) or isinstance(item, bool):
            raise ValueError(f"id {item!r} is neither a string nor an int")
        out.append(os.path.splitext(str(item))[0])
    return out


def read_captions(path: str, key: str) -> list[str]:
    """Non-empty lines of a caption file; an image without captions is refused."""
    captions = [line.strip() for line in files.read_text(path).splitlines() if line.strip()]
    if not captions:
        raise InvalidExampleError(f"example {key!r}: caption file {path!r} has no captions")
    return captions


class MmCelebaHq(CaptionedImages, skip_registration=True):
    """MM-CelebA-HQ: CelebA-HQ faces, captions and the official train/test id lists.

    Splits ``train`` and ``test`` follow ``train/filenames.pickle`` and ``test/filenames.pickle``
    (in pickle order); ``train`` is the paper's DP training set, so it is private by default (tagging it
    public needs ``DatasetSpec.override_private_default``). Features: ``image`` (R x R x 3,
    center-cropped and resized with Lanczos), ``captions`` (all captions of the image, in file order),
    ``id`` (the CelebA-HQ id).
    Configs ``256px`` (default), ``128px``, ``64px``; any other ``ResolutionConfig`` works too.
    """

    name = "mm_celeba_hq"
    BUILDER_CONFIGS = resolution_configs(256, 128, 64, what="MM-CelebA-HQ")
    SPLITS = SPLITS
    PRIVATE_BY_DEFAULT = ("train",)
    LAYOUT = LAYOUT
    SOURCE = SOURCE
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Place the release in the manual dir:\n{LAYOUT}\nSource: {SOURCE}"

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        root = self.manual_root(dl_manager)
        self.require_paths(root, ["CelebA-HQ-img", "celeba-caption"]
                           + [f"{s}/filenames.pickle" for s in SPLITS])
        ids = {}
        for split in SPLITS:
            try:
                ids[split] = read_ids(os.path.join(root, split, "filenames.pickle"))
            except (pickle.UnpicklingError, ValueError, EOFError) as e:
                raise self.layout_error(root, f"{split}/filenames.pickle is malformed: {e}") from None
            if not ids[split]:
                raise self.layout_error(root, f"{split}/filenames.pickle lists no ids (empty split)")
            if len(set(ids[split])) != len(ids[split]):
                raise self.layout_error(root, f"{split}/filenames.pickle lists some ids twice")
        shared = sorted(set(ids["train"]) & set(ids["test"]))
        if shared:
            raise self.layout_error(root, f"{len(shared)} ids are in both train and test, e.g. {shared[:5]}")
        images = {p.name for p in files.as_path(os.path.join(root, "CelebA-HQ-img")).iterdir()}
        texts = {p.name for p in files.as_path(os.path.join(root, "celeba-caption")).iterdir()}
        for split, split_ids in ids.items():
            missing = [i for i in split_ids if f"{i}.jpg" not in images or f"{i}.txt" not in texts]
            if missing:
                raise self.layout_error(root, f"{len(missing)} {split} ids lack CelebA-HQ-img/<id>.jpg or "
                                        f"celeba-caption/<id>.txt, e.g. {missing[:5]}")
        return {split: self._generate_examples(root, split_ids) for split, split_ids in ids.items()}

    def _generate_examples(self, root: str, ids: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
        r = self.builder_config.resolution
        for key in ids:
            pixels = read_image_file(os.path.join(root, "CelebA-HQ-img", f"{key}.jpg"), key)
            yield key, {
                "image": to_pil(prepare_image(pixels, key, r, 3)),
                "captions": read_captions(os.path.join(root, "celeba-caption", f"{key}.txt"), key),
                "id": key,
            }
