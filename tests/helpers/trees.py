"""Fixture trees of any size in the official release layouts, and the smoke specs of the paper configs.

The end-to-end smoke run of a paper config is::

    root = write_smoke_tree("mm_celeba_hq", tmp_path / "raw")
    python -m dpwave.main --config=<smoke_args("mm_celeba_hq", root)> --workdir=...

The layouts are the ones dpwave/data/builders/ reads (see their LAYOUT strings). tests/data/conftest.py
holds fixed-size pytest fixtures of the same layouts for the builders' own tests; these writers take
the size as an argument.
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

from experiments.configs import coco, mm_celeba_hq

CONFIGS = {"mm_celeba_hq": mm_celeba_hq, "coco": coco}


def _write_rgb(path: Path, rng: np.random.Generator, height: int, width: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)


def write_mm_celeba_hq_tree(root: str | os.PathLike, n: int, n_test: int = 5, seed: int = 0) -> Path:
    """MM-CelebA-HQ layout: `n` train and `n_test` test ids (40x40 jpgs), 10 captions each."""
    root, rng = Path(root), np.random.default_rng(seed)
    ids = {"train": [str(i) for i in range(n)], "test": [str(n + i) for i in range(n_test)]}
    (root / "celeba-caption").mkdir(parents=True, exist_ok=True)
    for split, split_ids in ids.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / split / "filenames.pickle").write_bytes(pickle.dumps(split_ids))
        for i in split_ids:
            _write_rgb(root / "CelebA-HQ-img" / f"{i}.jpg", rng, 40, 40)
            (root / "celeba-caption" / f"{i}.txt").write_text(
                "".join(f"a smiling face number {i}, caption {j}\n" for j in range(10)))
    return root


def write_coco_tree(root: str | os.PathLike, n: int, n_val: int = 5, seed: int = 1) -> Path:
    """COCO 2017 layout: `n` train2017 and `n_val` val2017 images (48x64 jpgs), 3 captions each."""
    root, rng = Path(root), np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    ann_id = 0
    for folder, image_ids in (("train2017", range(1, n + 1)), ("val2017", range(n + 1, n + n_val + 1))):
        images, annotations = [], []
        for image_id in image_ids:
            name = f"{image_id:012d}.jpg"
            _write_rgb(root / folder / name, rng, 48, 64)
            images.append({"id": image_id, "file_name": name, "height": 48, "width": 64})
            for j in range(3):
                ann_id += 1
                annotations.append({"id": ann_id, "image_id": image_id,
                                    "caption": f"a photo of object {image_id}, caption {j}"})
        (root / "annotations" / f"captions_{folder}.json").write_text(
            json.dumps({"info": {}, "images": images, "annotations": annotations}))
    return root


def write_image_folder(root: str | os.PathLike, n: int, seed: int = 2) -> Path:
    """A flat `image_folder` of `n` pngs (36x36) with captions.jsonl, one caption per image."""
    root, rng = Path(root), np.random.default_rng(seed)
    lines = []
    for i in range(n):
        _write_rgb(root / f"img{i:04d}.png", rng, 36, 36)
        lines.append(json.dumps({"file": f"img{i:04d}.png", "caption": f"public image {i}"}) + "\n")
    (root / "captions.jsonl").write_text("".join(lines))
    return root


def _module(config_name: str):
    if config_name not in CONFIGS:
        raise ValueError(f"unknown paper config {config_name!r}; known: {sorted(CONFIGS)}")
    return CONFIGS[config_name]


def write_smoke_tree(config_name: str, root: str | os.PathLike, n: int = 8) -> Path:
    """The raw releases `experiments/configs/<config_name>.py:smoke` reads, under `root`.

    `n` private training images, 5 held-out/test images, `n` public images.
    """
    module, root = _module(config_name), Path(root)
    private = root / module.PRIVATE_SUBDIR
    if config_name == "mm_celeba_hq":
        write_mm_celeba_hq_tree(private, n)
    else:
        write_coco_tree(private, n)
    write_image_folder(root / module.PUBLIC_SUBDIR, n)
    return root


def smoke_args(config_name: str, manual_dir: str | os.PathLike) -> str:
    """The `--config` value of the smoke variant on the tree `write_smoke_tree` wrote to `manual_dir`."""
    _module(config_name)
    manual_dir = os.fspath(manual_dir)
    if "," in manual_dir:
        raise ValueError(f"manual_dir={manual_dir!r} contains a comma, which ends an :arg value; "
                         "use a path without commas")
    return f"experiments/configs/{config_name}.py:smoke,manual_dir={manual_dir}"
