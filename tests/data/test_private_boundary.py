"""Private-by-default splits and the run-start content check (no private image in a public role)."""
import logging
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dpwave.data import DatasetSpec, PrivateOverlapError, PrivateSplitError, load, overlap
from dpwave.train import pipeline, settings
from experiments.configs import coco, mm_celeba_hq, mnist

pytestmark = pytest.mark.integration

ROLE = "config.data.public"


def spec(name, split, root, data_dir, privacy="public", resolution=8, **kw):
    return DatasetSpec(name, split, privacy, data_dir=data_dir, manual_dir=os.fspath(root), resolution=resolution,
                       **kw)


def flat_folder(root: Path, names, seed) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(root / name)
    return root


@pytest.fixture
def folders(tmp_path):
    """A private folder (p0..p3) and a public one (q0..q2) plus a copy of private p2.png as leak.png."""
    private = flat_folder(tmp_path / "private", [f"p{i}.png" for i in range(4)], seed=10)
    public = flat_folder(tmp_path / "public", [f"q{i}.png" for i in range(3)], seed=11)
    shutil.copy(private / "p2.png", public / "leak.png")
    return private, public


@pytest.mark.parametrize("name, split, tree", [
    ("mm_celeba_hq", "train", "celeba_tree"), ("mm_celeba_hq", "train[:50%]", "celeba_tree"),
    ("coco_captions", "train", "coco_tree"), ("image_folder", "train", "caption_folder"),
    ("image_folder", "test", "class_folder")])
def test_private_by_default_split_needs_the_logged_override(name, split, tree, data_dir, request, caplog):
    root = request.getfixturevalue(tree)
    with pytest.raises(PrivateSplitError) as info:
        load(spec(name, split, root, data_dir), role=ROLE)
    message = str(info.value)
    assert "\n" not in message
    assert f"{ROLE} ({name}/{split})" in message and "private by default" in message
    assert f"--{ROLE}.override_private_default=True" in message
    with pytest.raises(PrivateSplitError, match=r"DatasetSpec\(override_private_default=True\)"):
        load(spec(name, split, root, data_dir))
    with caplog.at_level(logging.WARNING):
        source = load(spec(name, split, root, data_dir, override_private_default=True), role=ROLE)
    assert len(source) > 0
    assert any(ROLE in r.getMessage() and "override_private_default=True" in r.getMessage()
               and r.levelno == logging.WARNING for r in caplog.records)


def test_other_splits_stay_public_without_a_warning(celeba_tree, coco_tree, data_dir, caplog):
    with caplog.at_level(logging.WARNING):
        load(spec("mm_celeba_hq", "test", celeba_tree, data_dir), role=ROLE)
        load(spec("coco_captions", "validation", coco_tree, data_dir), role=ROLE)
    assert not [r for r in caplog.records if "override_private_default" in r.getMessage()]


def test_always_private_split_ignores_the_override(data_dir):
    with pytest.raises(PrivateSplitError, match=r"config.data.heldout \(mnist5k/private\).*privacy='private'"):
        load(DatasetSpec("mnist5k", "private", "public", data_dir=data_dir, override_private_default=True),
             role="config.data.heldout")


def test_override_is_a_bool_and_a_config_key():
    with pytest.raises(ValueError, match="override_private_default='yes' must be True or False"):
        DatasetSpec("image_folder", "train", "public", override_private_default="yes")
    assert DatasetSpec.from_config({"name": "a", "split": "b", "privacy": "public"}).override_private_default is False
    for module in (mm_celeba_hq, coco):
        config = module.get_config("manual_dir=/raw")
        specs = settings.read(config).data.specs
        assert {role: specs[role].override_private_default for role in settings.ROLES} == {
            "public": True, "private": False, "heldout": False, "test": False}
    demo = mnist.get_config("demo")
    assert not any(demo.data[role].override_private_default for role in settings.ROLES)


def test_heldout_role_naming_a_private_by_default_split_is_refused_by_config(celeba_tree, tmp_path):
    config = mm_celeba_hq.get_config(f"smoke,manual_dir={tmp_path}")
    config.data.heldout.update(manual_dir=os.fspath(celeba_tree), split="train[:2]")
    with pytest.raises(PrivateSplitError, match=r"config.data.heldout \(mm_celeba_hq/train\[:2\]\).*--config.data"
                                                r".heldout.override_private_default=True"):
        settings.read(config).data.load("heldout")


def test_overlap_is_found_with_count_and_ids(folders, data_dir):
    private_dir, public_dir = folders
    private = load(spec("image_folder", "train", private_dir, data_dir, privacy="private"))
    public = load(spec("image_folder", "train", public_dir, data_dir, override_private_default=True))
    heldout = load(spec("image_folder", "train", private_dir, data_dir, override_private_default=True))
    with pytest.raises(PrivateOverlapError) as info:
        overlap.check_disjoint(private, {ROLE: public, "config.data.heldout": heldout})
    message = str(info.value)
    assert "\n" not in message
    assert f"{ROLE} (image_folder/train) holds 1 of 4 images" in message
    assert "'leak.png' = private 'p2.png'" in message
    assert "config.data.heldout (image_folder/train) holds 4 of 4 images" in message
    os.remove(public_dir / "leak.png")  # a changed folder is a new dataset: disjoint now
    clean = load(spec("image_folder", "train", public_dir, data_dir, override_private_default=True))
    hashes = overlap.check_disjoint(private, {ROLE: clean})
    assert (hashes["private"].hashed, hashes[ROLE].hashed) == (0, 3)  # private from the cache


def test_hash_cache_is_owner_only_reused_and_invalidated(folders, data_dir):
    private_dir, _ = folders
    private = load(spec("image_folder", "train", private_dir, data_dir, privacy="private"))
    first = overlap.pixel_hashes(private)
    assert first.hashed == 4 and first.cache_path == overlap.cache_path(private)
    path = Path(first.cache_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    mtime = path.stat().st_mtime_ns
    again = overlap.pixel_hashes(load(spec("image_folder", "train", private_dir, data_dir, privacy="private")))
    assert again.hashed == 0 and path.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(again.digests, first.digests)
    # Another resolution, or a rebuilt data file, is another fingerprint.
    larger = overlap.pixel_hashes(load(spec("image_folder", "train", private_dir, data_dir, privacy="private",
                                            resolution=10)))
    assert larger.hashed == 4 and larger.cache_path != first.cache_path
    data_file = private.data_files[0][0]
    os.utime(data_file, ns=(mtime + 10**9, mtime + 10**9))
    rebuilt = overlap.pixel_hashes(private)
    assert rebuilt.hashed == 4 and rebuilt.cache_path not in (first.cache_path, larger.cache_path)
    np.testing.assert_array_equal(rebuilt.digests, first.digests)


def test_corrupt_cache_is_rehashed(folders, data_dir, caplog):
    private = load(spec("image_folder", "train", folders[0], data_dir, privacy="private"))
    first = overlap.pixel_hashes(private)
    Path(first.cache_path).write_bytes(b"not an npy file")
    with caplog.at_level(logging.WARNING):
        again = overlap.pixel_hashes(private)
    assert again.hashed == 4 and any("hashing again" in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(again.digests, first.digests)


def test_mnist5k_roles_are_disjoint(data_dir):
    config = mnist.get_config("tiny")
    for role in settings.ROLES:
        config.data[role].data_dir = data_dir
    hashes = settings.read(config).data.check_boundary()
    assert {role: len(h.digests) for role, h in hashes.items()} == {
        "private": 2000, "config.data.public": 1500, "config.data.heldout": 500, "config.data.test": 1000}


def test_run_refuses_a_leaked_image_before_any_stage(folders, tmp_path):
    private_dir, public_dir = folders
    config = mnist.get_config("tiny")
    data_dir = os.fspath(tmp_path / "tfds")
    for role in settings.ROLES:
        config.data[role].data_dir = data_dir
    config.data.private.update(name="image_folder", split="train", manual_dir=os.fspath(private_dir))
    config.data.public.update(name="image_folder", split="train", manual_dir=os.fspath(public_dir),
                              override_private_default=True)
    workdir = tmp_path / "run"
    with pytest.raises(PrivateOverlapError, match=r"config.data.public \(image_folder/train\) holds 1 of 4 images"):
        pipeline.train_and_evaluate(config, os.fspath(workdir))
    assert not workdir.exists()  # no stage started, no config.json written
