"""``coco_captions``: MS-COCO 2017 images with their captions, from the official release layout."""
from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import tensorflow_datasets as tfds

from dpwave import files
from dpwave.data.builders.base import CaptionedImages, resolution_configs, to_pil
from dpwave.data.errors import InvalidExampleError
from dpwave.data.images import prepare_image, read_image_file

LAYOUT = """\
  train2017/<12-digit id>.jpg              118,287 training images
  val2017/<12-digit id>.jpg                5,000 validation images
  annotations/captions_train2017.json      COCO caption annotations (images + annotations)
  annotations/captions_val2017.json"""
SOURCE = ("https://cocodataset.org/#download: train2017.zip, val2017.zip, "
          "annotations_trainval2017.zip")
SPLITS = {"train": "train2017", "validation": "val2017"}


def parse_caption_json(data: Any) -> list[tuple[int, str, list[str]]]:
    """``(image id, file name, captions)`` per image, sorted by id; captions by annotation id.

    Raises:
      ValueError: the JSON is not a COCO caption file.
    """
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ValueError("expected a JSON object with 'images' and 'annotations'")
    files = {}
    for image in data["images"]:
        files[int(image["id"])] = str(image["file_name"])
    captions: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for ann in data["annotations"]:
        image_id = int(ann["image_id"])
        if image_id not in files:
            raise ValueError(f"annotation {ann.get('id')} refers to unknown image_id {image_id}")
        captions[image_id].append((int(ann["id"]), str(ann["caption"]).strip()))
    return [(i, files[i], [c for _, c in sorted(captions[i])]) for i in sorted(files)]


class CocoCaptions(CaptionedImages, skip_registration=True):
    """MS-COCO 2017 captions: images center-cropped and resized to R x R x 3, with all captions.

    Splits ``train`` (train2017) and ``validation`` (val2017), ordered by image id; ``train`` is the
    paper's DP training set, so it is private by default (tagging it public needs
    ``DatasetSpec.override_private_default``). Features:
    ``image``, ``captions`` (ordered by annotation id), ``id`` (the COCO image id). Configs ``256px``
    (default), ``128px``, ``64px``; any other ``ResolutionConfig`` works too. Reading needs only the
    JSON module, not TensorFlow. (TFDS' own ``coco_captions`` builder needs TensorFlow and is not used.)
    """

    name = "coco_captions"
    BUILDER_CONFIGS = resolution_configs(256, 128, 64, what="MS-COCO 2017 captions")
    SPLITS = tuple(SPLITS)  # the module's split -> folder names
    PRIVATE_BY_DEFAULT = ("train",)
    LAYOUT = LAYOUT
    SOURCE = SOURCE
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Place the release in the manual dir:\n{LAYOUT}\nSource: {SOURCE}"

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        root = self.manual_root(dl_manager)
        self.require_paths(root, [p for folder in SPLITS.values()
                                  for p in (folder, f"annotations/captions_{folder}.json")])
        generators = {}
        for split, folder in SPLITS.items():
            json_path = os.path.join(root, "annotations", f"captions_{folder}.json")
            try:
                records = parse_caption_json(files.read_json(json_path))
            except (ValueError, KeyError, TypeError) as e:
                raise self.layout_error(root, f"{json_path} is malformed: {e!r}") from None
            if not records:
                raise self.layout_error(root, f"{json_path} lists no images (empty split)")
            present = {p.name for p in files.as_path(os.path.join(root, folder)).iterdir()}
            missing = [name for _, name, _ in records if name not in present]
            if missing:
                raise self.layout_error(root, f"{len(missing)} images listed in {json_path} are missing "
                                        f"from {folder}/, e.g. {missing[:5]}")
            generators[split] = self._generate_examples(os.path.join(root, folder), records)
        return generators

    def _generate_examples(self, folder: str, records: list[tuple[int, str, list[str]]]
                           ) -> Iterator[tuple[str, dict[str, Any]]]:
        r = self.builder_config.resolution
        for image_id, file_name, captions in records:
            key = str(image_id)
            if not captions:
                raise InvalidExampleError(f"example {key!r} ({file_name}) has no captions")
            pixels = read_image_file(os.path.join(folder, file_name), key)
            yield key, {"image": to_pil(prepare_image(pixels, key, r, 3)), "captions": captions,
                        "id": key}
