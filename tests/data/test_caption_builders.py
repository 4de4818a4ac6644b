"""mm_celeba_hq and coco_captions on fixture trees in the official release layouts."""
import json
import os
import pickle

import numpy as np
import pytest

from dpwave.data import DatasetLayoutError, DatasetSpec, InvalidExampleError, load
from dpwave.data.builders import CocoCaptions, MmCelebaHq, Mnist5k

pytestmark = pytest.mark.integration


def celeba(split, manual_dir, data_dir, resolution=16):
    return load(DatasetSpec("mm_celeba_hq", split, "private", data_dir=data_dir,
                            manual_dir=os.fspath(manual_dir), resolution=resolution))


def test_mm_celeba_hq_builds_splits_in_pickle_order(celeba_tree, data_dir):
    train = celeba("train", celeba_tree, data_dir)
    test = celeba("test", celeba_tree, data_dir)
    assert (len(train), len(test)) == (4, 2)
    assert [train[i]["id"] for i in range(4)] == ["10", "3", "7", "0"]
    example = train[1]
    assert example["image"].shape == (16, 16, 3) and example["image"].dtype == np.uint8
    assert example["captions"] == [f"face 3 caption {j}" for j in range(10)]
    assert example["caption"] == "face 3 caption 0"
    batch = test.get_batch([1, 0])
    assert batch["image"].shape == (2, 16, 16, 3)
    assert list(batch["caption"]) == ["face 5 caption 0", "face 21 caption 0"]
    assert list(batch["id"]) == ["5", "21"]
    assert os.path.isdir(os.path.join(data_dir, "mm_celeba_hq", "16px", "1.0.0"))


def test_mm_celeba_hq_missing_manual_dir_lists_the_layout(tmp_path, data_dir):
    with pytest.raises(DatasetLayoutError) as info:
        celeba("train", tmp_path / "nowhere", data_dir)
    message = str(info.value)
    for expected in ("does not exist or is empty", "CelebA-HQ-img/<id>.jpg",
                     "celeba-caption/<id>.txt", "train/filenames.pickle",
                     "github.com/IIGROUP/MM-CelebA-HQ-Dataset"):
        assert expected in message
    assert not os.path.exists(os.path.join(data_dir, "mm_celeba_hq", "16px", "1.0.0"))


@pytest.mark.parametrize("break_tree, match", [
    (lambda root: os.remove(root / "test" / "filenames.pickle"), r"missing \['test/filenames"),
    (lambda root: (root / "train" / "filenames.pickle").write_bytes(b"garbage"),
     "train/filenames.pickle is malformed"),
    (lambda root: (root / "train" / "filenames.pickle").write_bytes(pickle.dumps({"a": 1})),
     "expected a list of ids"),
    (lambda root: (root / "train" / "filenames.pickle").write_bytes(
        pickle.dumps([np.int64(3)])), "refusing to load numpy"),
    (lambda root: (root / "test" / "filenames.pickle").write_bytes(pickle.dumps(["5", "3"])),
     r"1 ids are in both train and test, e.g. \['3'\]"),
    (lambda root: os.remove(root / "CelebA-HQ-img" / "7.jpg"), r"1 train ids lack.*\['7'\]"),
    (lambda root: (root / "test" / "filenames.pickle").write_bytes(pickle.dumps([])),
     "lists no ids"),
])
def test_mm_celeba_hq_malformed_layouts(celeba_tree, data_dir, break_tree, match):
    break_tree(celeba_tree)
    with pytest.raises(DatasetLayoutError, match=match) as info:
        celeba("train", celeba_tree, data_dir)
    assert "expected layout:" in str(info.value)


def test_mm_celeba_hq_empty_caption_file_names_the_id(celeba_tree, data_dir):
    (celeba_tree / "celeba-caption" / "7.txt").write_text("\n  \n")
    with pytest.raises(InvalidExampleError, match="'7'.*no captions"):
        celeba("train", celeba_tree, data_dir)


def coco(split, manual_dir, data_dir):
    privacy = "private" if split == "train" else "public"  # train is private by default
    return load(DatasetSpec("coco_captions", split, privacy, data_dir=data_dir,
                            manual_dir=os.fspath(manual_dir), resolution=12))


def test_coco_captions_builds_cropped_images_and_ordered_captions(coco_tree, data_dir):
    train = coco("train", coco_tree, data_dir)
    assert [train[i]["id"] for i in range(len(train))] == ["7", "13", "42"]
    gray = train[0]
    assert gray["image"].shape == (12, 12, 3)
    np.testing.assert_array_equal(gray["image"][..., 0], gray["image"][..., 1])  # grayscale -> RGB
    assert gray["captions"] == ["image 7 caption 0", "image 7 caption 1", "image 7 caption 2"]
    val = coco("validation", coco_tree, data_dir)
    batch = val.get_batch([0, 1])
    assert list(batch["id"]) == ["8", "99"]
    assert list(batch["caption"]) == ["image 8 caption 0", "image 99 caption 0"]
    assert val.privacy == "public"


@pytest.mark.parametrize("break_tree, match", [
    (lambda root: os.rename(root / "val2017", root / "val"), r"missing \['val2017'\]"),
    (lambda root: (root / "annotations" / "captions_train2017.json").write_text("{oops"),
     "captions_train2017.json is malformed"),
    (lambda root: (root / "annotations" / "captions_val2017.json").write_text('{"images": []}'),
     "'images' and 'annotations'"),
    (lambda root: (root / "annotations" / "captions_val2017.json").write_text(
        json.dumps({"images": [], "annotations": []})), "lists no images"),
    (lambda root: os.remove(root / "train2017" / "000000000013.jpg"),
     r"1 images listed in .* are missing from train2017/, e.g. \['000000000013.jpg'\]"),
    (lambda root: (root / "annotations" / "captions_val2017.json").write_text(json.dumps(
        {"images": [{"id": 8, "file_name": "000000000008.jpg"}],
         "annotations": [{"id": 1, "image_id": 5, "caption": "x"}]})), "unknown image_id 5"),
])
def test_coco_captions_malformed_layouts(coco_tree, data_dir, break_tree, match):
    break_tree(coco_tree)
    with pytest.raises(DatasetLayoutError, match=match) as info:
        coco("train", coco_tree, data_dir)
    assert "cocodataset.org" in str(info.value) and "train2017/<12-digit id>.jpg" in str(info.value)


def test_config_for_a_resolution():
    assert MmCelebaHq.config_for(64, None, None) == "64px"
    custom = CocoCaptions.config_for(20, 1, None)
    assert (custom.name, custom.resolution) == ("20px", 20)
    assert MmCelebaHq.config_for(None, None, None) is None  # the default, 256px
    assert MmCelebaHq(data_dir="/nonexistent").builder_config.resolution == 256
    assert Mnist5k.config_for(16, 3, None) is None  # fixed 32x32x1; resized at read time


def test_builders_write_only_array_record(tmp_path):
    with pytest.raises(ValueError, match="file_format='parquet'.*only 'array_record'"):
        Mnist5k(data_dir=str(tmp_path), file_format="parquet")


def test_in_memory_source_matches_disk(celeba_tree, data_dir):
    disk = celeba("test", celeba_tree, data_dir)
    memory = load(DatasetSpec("mm_celeba_hq", "test", "private", data_dir=data_dir,
                              manual_dir=os.fspath(celeba_tree), resolution=16, in_memory=True))
    for i in range(len(disk)):
        a, b = disk[i], memory[i]
        assert a.keys() == b.keys()
        np.testing.assert_array_equal(a["image"], b["image"])
        assert (a["captions"], a["caption"], a["id"]) == (b["captions"], b["caption"], b["id"])
    for key, value in disk.get_batch([1, 0, 1]).items():
        np.testing.assert_array_equal(value, memory.get_batch([1, 0, 1])[key])
