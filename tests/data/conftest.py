"""Fixture trees in the official release layouts, written into tmp_path (small images, few ids)."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_image(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def random_rgb(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture
def celeba_tree(tmp_path: Path) -> Path:
    """MM-CelebA-HQ layout: 4 train ids, 2 test ids, 10 captions each, 40x40 jpgs."""
    root = tmp_path / "mm_celeba_hq_raw"
    rng = np.random.default_rng(0)
    ids = {"train": ["10", "3", "7", "0"], "test": ["21", "5"]}
    for split, split_ids in ids.items():
        (root / split).mkdir(parents=True)
        with open(root / split / "filenames.pickle", "wb") as f:
            pickle.dump(split_ids, f)
        for i in split_ids:
            write_image(root / "CelebA-HQ-img" / f"{i}.jpg", random_rgb(rng, 40, 40))
            (root / "celeba-caption").mkdir(exist_ok=True)
            (root / "celeba-caption" / f"{i}.txt").write_text(
                "".join(f"face {i} caption {j}\n" for j in range(10)))
    return root


@pytest.fixture
def coco_tree(tmp_path: Path) -> Path:
    """COCO 2017 layout: 3 train and 2 val images (non-square, one grayscale), 2-3 captions each."""
    root = tmp_path / "coco_raw"
    rng = np.random.default_rng(1)
    next_ann = 100
    for split, image_ids in (("train2017", [42, 7, 13]), ("val2017", [99, 8])):
        images, annotations = [], []
        for image_id in image_ids:
            name = f"{image_id:012d}.jpg"
            pixels = random_rgb(rng, 30, 50)
            write_image(root / split / name, pixels[..., 0] if image_id == 7 else pixels)
            images.append({"id": image_id, "file_name": name, "height": 30, "width": 50})
            for j in (2, 1, 0) if image_id != 8 else (0, 1):
                annotations.append({"id": next_ann + j, "image_id": image_id,
                                    "caption": f" image {image_id} caption {j} "})
            next_ann += 10
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        (root / "annotations" / f"captions_{split}.json").write_text(
            json.dumps({"info": {}, "images": images, "annotations": annotations}))
    return root


@pytest.fixture
def class_folder(tmp_path: Path) -> Path:
    """train/{cat,dog}/ and test/{cat,dog}/ with 3 + 2 and 1 + 1 png/jpg images of mixed sizes."""
    root = tmp_path / "pets"
    rng = np.random.default_rng(2)
    for split, counts in (("train", {"dog": 2, "cat": 3}), ("test", {"dog": 1, "cat": 1})):
        for cls, count in counts.items():
            for k in range(count):
                ext = "png" if k % 2 else "jpg"
                write_image(root / split / cls / f"{cls}{k}.{ext}", random_rgb(rng, 20 + k, 24))
    (root / "README.txt").write_text("not an image")
    return root


@pytest.fixture
def caption_folder(tmp_path: Path) -> Path:
    """A flat folder of 3 images with captions.jsonl (image b.png has two captions)."""
    root = tmp_path / "captioned"
    rng = np.random.default_rng(3)
    for name in ("a.png", "b.png", "c.jpg"):
        write_image(root / name, random_rgb(rng, 16, 16))
    lines = [{"file": "a.png", "caption": "first"}, {"file": "b.png", "caption": "second"},
             {"file": "c.jpg", "caption": "third"}, {"file": "b.png", "caption": "second again"}]
    (root / "captions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


@pytest.fixture
def data_dir(tmp_path: Path) -> str:
    return os.fspath(tmp_path / "tfds")
