"""image_folder: class subfolders, flat folders with captions, and the build-time refusals."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from dpwave.data import (DataError, DatasetLayoutError, DatasetSpec, InvalidExampleError, PrivateSplitError,
                         SplitExpressionError, load)
from dpwave.data.builders import folder_scan, image_folder_config
from dpwave.data.builders.image_folder import carve

pytestmark = pytest.mark.integration


def small_png(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4, 3), 9, np.uint8)).save(path)


def folder(split, root, data_dir, resolution=8, channels=None, privacy="private"):
    return load(DatasetSpec("image_folder", split, privacy, data_dir=data_dir,
                            manual_dir=os.fspath(root), resolution=resolution, channels=channels))


def test_class_subfolders_with_split_folders(class_folder, data_dir):
    train = folder("train", class_folder, data_dir)
    test = folder("test", class_folder, data_dir)
    batch = train.get_batch(np.arange(len(train)))
    assert batch["image"].shape == (5, 8, 8, 3)
    assert list(batch["id"]) == ["train/cat/cat0.jpg", "train/cat/cat1.png", "train/cat/cat2.jpg",
                                 "train/dog/dog0.jpg", "train/dog/dog1.png"]
    np.testing.assert_array_equal(batch["label"], [0, 0, 0, 1, 1])  # sorted class names: cat, dog
    assert [test[i]["label"] for i in range(len(test))] == [0, 1]
    assert "caption" not in test[0]


def test_flat_folder_with_captions_single_train_split_and_gray(caption_folder, data_dir):
    source = folder("train", caption_folder, data_dir, resolution=4, channels=1)
    assert len(source) == 3
    assert source[1]["captions"] == ["second", "second again"]
    assert source[1]["caption"] == "second"
    assert source[0]["image"].shape == (4, 4, 1)
    assert "label" not in source[0]
    with pytest.raises(SplitExpressionError, match=r"unknown split\(s\) \['test'\]; the valid splits are \['train'\]"):
        folder("test", caption_folder, data_dir, resolution=4, channels=1)


def test_changed_folder_gets_a_new_config(caption_folder):
    before = image_folder_config(os.fspath(caption_folder), 8)
    assert before.name == f"captioned_8px_3ch_{before.fingerprint}"
    assert image_folder_config(os.fspath(caption_folder), 8).name == before.name
    with open(caption_folder / "captions.jsonl", "a") as f:
        f.write(json.dumps({"file": "a.png", "caption": "more"}) + "\n")
    assert image_folder_config(os.fspath(caption_folder), 8).name != before.name


def test_an_image_edited_in_place_to_the_same_size_is_read_again(tmp_path, data_dir):
    """The prepared copy is keyed by each file's size and modification time, not its size alone: an edit that keeps
    the byte count (here an uncompressed BMP) must not serve the old pixels."""
    root = tmp_path / "flat"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.bmp", "b.bmp"):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / name)
    before = folder("train", root, data_dir)[0]["image"]
    path = root / "a.bmp"
    size, mtime = path.stat().st_size, path.stat().st_mtime_ns
    Image.fromarray(255 - np.asarray(Image.open(path))).save(path)
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))  # a later edit, even on a coarse-clock file system
    assert path.stat().st_size == size
    np.testing.assert_array_equal(folder("train", root, data_dir)[0]["image"], 255 - before)


def test_nan_pixels_are_refused_at_build_time_naming_the_image(class_folder, data_dir):
    bad = np.full((6, 6), 0.5, np.float32)
    bad[1, 2] = np.nan
    Image.fromarray(bad).save(class_folder / "train" / "dog" / "dog9.tif")
    with pytest.raises(InvalidExampleError, match=r"'train/dog/dog9.tif': 1 pixel values are NaN"):
        folder("train", class_folder, data_dir)
    assert not any(name.endswith("1.0.0") for _, dirs, _ in os.walk(data_dir) for name in dirs)


@pytest.mark.parametrize("break_tree, match", [
    (lambda root: small_png(root / "stray.png"), r"\['stray.png'\] sit beside the split folders"),
    (lambda root: small_png(root / "train" / "cat" / "kitten" / "x.png"),
     r"class folder train/cat/ contains folders \['kitten'\]"),
    (lambda root: small_png(root / "test" / "loose.png"), "mixes class subfolders"),
])
def test_malformed_class_folders(class_folder, data_dir, break_tree, match):
    break_tree(class_folder)
    with pytest.raises(DatasetLayoutError, match=match) as info:
        folder("train", class_folder, data_dir)
    assert "captions.jsonl" in str(info.value)  # the message shows the expected layout


@pytest.mark.parametrize("lines, match", [
    (['{"file": "a.png"}'], r"captions.jsonl:1 is not a"),
    (["not json"], r"captions.jsonl:1 is not a"),
    (['{"file": "zzz.png", "caption": "x"}'], r"captions 'zzz.png', which is not an image"),
    (['{"file": "a.png", "caption": "x"}'], r"2 images in .* have no caption.*\['b.png', 'c.jpg'\]"),
])
def test_malformed_captions(caption_folder, data_dir, lines, match):
    (caption_folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetLayoutError, match=match):
        folder("train", caption_folder, data_dir)


def test_empty_and_missing_folders(tmp_path, data_dir):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match="split 'train' .* has no images"):
        folder("train", tmp_path / "empty", data_dir)
    with pytest.raises(DatasetLayoutError, match="does not exist"):
        folder("train", tmp_path / "absent", data_dir)
    with pytest.raises(DataError, match="needs manual_dir .* and resolution"):
        load(DatasetSpec("image_folder", "train", "private", data_dir=data_dir,
                         manual_dir=os.fspath(tmp_path)))


def write_png(path, pixels):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def test_carve_splits_each_class_deterministically_into_disjoint_parts_that_stay_private_by_default(tmp_path,
                                                                                                     data_dir):
    rng = np.random.default_rng(4)
    for cls, count in (("cat", 20), ("dog", 10)):
        for k in range(count):
            write_png(tmp_path / "pets" / cls / f"{k:02d}.png", rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    scan = folder_scan.scan_folder(os.fspath(tmp_path / "pets"))
    parts = carve(scan, {"heldout": 0.15, "test": 0.15})
    assert parts == {"public": "train[0:14]+train[20:26]", "heldout": "train[14:17]+train[26:28]",
                     "test": "train[17:20]+train[28:30]"}
    assert carve(scan, {"heldout": 0.15, "test": 0.15}) == parts
    ids = {}
    for role, split in parts.items():
        source = load(DatasetSpec("image_folder", split, "public", data_dir=data_dir, override_private_default=True,
                                  manual_dir=os.fspath(tmp_path / "pets"), resolution=6), role=role)
        ids[role] = list(source.get_batch(np.arange(len(source)))["id"])
    assert ids["heldout"] == ["cat/14.png", "cat/15.png", "cat/16.png", "dog/06.png", "dog/07.png"]
    assert sorted(i for part in ids.values() for i in part) == sorted(e.relpath for e in scan.splits["train"])
    with pytest.raises(PrivateSplitError, match="override_private_default"):
        folder(parts["test"], tmp_path / "pets", data_dir, resolution=6, privacy="public")
    with pytest.raises(DataError, match="class 'dog' has 10 images, too few to carve"):
        carve(scan, {"heldout": 0.05, "test": 0.9})  # each part gets at least one: 1 + 9 of the 10 dogs


def test_read_headers_gives_size_and_mode_without_decoding(tmp_path):
    write_png(tmp_path / "flat" / "grey.png", np.zeros((5, 7), np.uint8))
    write_png(tmp_path / "flat" / "rgba.png", np.zeros((4, 4, 4), np.uint8))
    (tmp_path / "flat" / "broken.jpg").write_bytes(b"not an image")
    scan = folder_scan.scan_folder(os.fspath(tmp_path / "flat"))
    good = [e for e in scan.splits["train"] if e.relpath != "broken.jpg"]
    headers = folder_scan.read_headers(os.fspath(tmp_path / "flat"), good)
    assert [(h.relpath, h.size, h.mode, h.channels) for h in headers] == [("grey.png", (7, 5), "L", 1),
                                                                          ("rgba.png", (4, 4), "RGBA", 3)]
    with pytest.raises(InvalidExampleError, match="'broken.jpg': cannot read the header"):
        folder_scan.read_headers(os.fspath(tmp_path / "flat"), scan.splits["train"])
