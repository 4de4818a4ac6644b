"""The run-start privacy boundary runs in every mode that reads data: dp, epsilon inf, the public-only control
(epsilon=public) and tuning (dp.mechanism.tuning). Each test runs the pipeline only up to the boundary: writing the
run info, the first thing after it, is replaced by a sentinel."""
from __future__ import annotations

import os
import re
import stat

import numpy as np
import pytest
from PIL import Image

from dpwave.data import DatasetSpec, PrivateOverlapError, PrivateSplitError, load, overlap
from dpwave.train import pipeline, settings
from experiments.configs import mnist

pytestmark = pytest.mark.integration

MODES = {
    "dp": {},
    "epsinf": {"dp.mechanism.target_epsilon": float("inf")},
    "public_only": {"dp.mechanism.target_epsilon": 0.0},
    "tuning": {"dp.mechanism.tuning": True, "dp.mechanism.tuning_private_size": 2000, "data.private.split": "heldout",
               "data.private.privacy": "public"},
}
# (role, split expression): each reads mnist5k's private split.
LEAKS = [("public", "all"), ("public", "public+private[:10]"), ("heldout", "heldout+all"), ("test", "private+test")]


class PastTheBoundary(Exception):
    """The pipeline got past the run-start boundary (it would now write the run info and train)."""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return os.fspath(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(autouse=True)
def stop_after_boundary(monkeypatch):
    def stop(config, workdir):
        raise PastTheBoundary(workdir)

    monkeypatch.setattr(pipeline, "write_run_info", stop)


def mode_config(mode: str, data_dir: str, **splits: str):
    """`mnist.py:tiny` in `mode`, reading mnist5k from `data_dir`, with `splits` ({role: expression}) set."""
    config = mnist.get_config("tiny")
    with config.unlocked():
        for path, value in MODES[mode].items():
            *parents, leaf = path.split(".")
            node = config
            for name in parents:
                node = node[name]
            node[leaf] = value
        for role in settings.ROLES:
            config.data[role].data_dir = data_dir
        for role, split in splits.items():
            config.data[role].split = split
    return config


@pytest.mark.parametrize("role, expression", LEAKS)
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_refuses_a_split_expression_reading_private_data_before_any_stage(mode, role, expression,
                                                                                      data_dir, tmp_path):
    config = mode_config(mode, data_dir, **{role: expression})
    assert settings.read(config).mode == ("dp" if mode == "epsinf" else mode)
    workdir = tmp_path / "run"
    where = re.escape(f"config.data.{role} (mnist5k/{expression})")
    with pytest.raises(PrivateSplitError, match=rf"^{where}.*\['private'\] hold private data"):
        pipeline.train_and_evaluate(config, os.fspath(workdir))
    assert not workdir.exists()


@pytest.mark.parametrize("mode", MODES)
def test_settings_boundary_resolves_all_in_every_mode(mode, data_dir):
    run = settings.read(mode_config(mode, data_dir, public="all"))
    with pytest.raises(PrivateSplitError, match=r"the expression 'all' reads \['heldout', 'private', 'public', "
                                                r"'test'\]"):
        run.data.check_boundary()


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_runs_the_boundary_and_all_but_tuning_the_content_check(mode, data_dir, tmp_path, monkeypatch):
    checked = []
    check_disjoint = overlap.check_disjoint

    def spy(private, public, **options):
        checked.append((private.spec.label, private.privacy, sorted(public)))
        return check_disjoint(private, public, **options)

    monkeypatch.setattr(overlap, "check_disjoint", spy)
    with pytest.raises(PastTheBoundary):
        pipeline.train_and_evaluate(mode_config(mode, data_dir), os.fspath(tmp_path / "run"))
    if mode == "tuning":  # no private data is named: the stand-in and every other role are public and split-checked
        assert checked == []
        assert settings.read(mode_config(mode, data_dir)).data.check_boundary() == {}
    else:  # the private split is read only to hash its pixels (the public-only control trains nothing on it)
        assert checked == [("mnist5k/private", "private",
                            ["config.data.heldout", "config.data.public", "config.data.test"])]


def leaky_folder(root, private_image: np.ndarray):
    """A flat folder of two random 32x32 grey digits-like images plus a copy of a private digit."""
    rng = np.random.default_rng(0)
    root.mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(root / f"q{i}.png")
    Image.fromarray(private_image[..., 0]).save(root / "leak.png")
    return root


def public_folder_config(mode: str, data_dir: str, folder):
    """`mode_config` with the image folder `folder` as the public role (tagged public by the operator)."""
    config = mode_config(mode, data_dir)
    with config.unlocked():
        config.data.public.update(name="image_folder", split="train", manual_dir=os.fspath(folder),
                                  override_private_default=True)
    return config


@pytest.mark.parametrize("mode", ["dp", "epsinf", "public_only"])
def test_content_check_refuses_a_private_image_in_a_public_role(mode, data_dir, tmp_path):
    private = load(DatasetSpec("mnist5k", "private", "private", data_dir=data_dir))
    config = public_folder_config(mode, data_dir, leaky_folder(tmp_path / "public", private[3]["image"]))
    workdir = tmp_path / "run"
    with pytest.raises(PrivateOverlapError, match=rf"config.data.public \(image_folder/train\) holds 1 of 3 images "
                                                  rf"identical to private ones \(e.g. 'leak.png' = private "
                                                  rf"'{private[3]['id']}'\)"):
        pipeline.train_and_evaluate(config, os.fspath(workdir))
    assert not workdir.exists()


def test_the_run_refuses_a_near_copy_and_reports_the_pairs_beside_the_private_data(data_dir, tmp_path):
    """A private digit with its brightest pixel set to black, in the public folder, stops the run before any stage;
    the closest pairs go to an owner-only report beside the private set's cached descriptors, not into the workdir;
    the config's threshold is the one applied."""
    private = load(DatasetSpec("mnist5k", "private", "private", data_dir=data_dir))
    edited = private[3]["image"].copy()
    edited[np.unravel_index(np.argmax(edited), edited.shape)] = 0  # similarity 0.99994
    config = public_folder_config("dp", data_dir, leaky_folder(tmp_path / "public", edited))
    workdir = tmp_path / "run"
    with pytest.raises(PrivateOverlapError, match=rf"config.data.public \(image_folder/train\) holds 1 of 3 near "
                                                  rf"copies of private images \(e.g. 'leak.png' ~ private "
                                                  rf"'{private[3]['id']}' \(0.99") as info:
        pipeline.train_and_evaluate(config, os.fspath(workdir))
    assert not workdir.exists()
    report = str(info.value).rsplit("; the closest pairs: ", 1)[1]
    assert os.path.dirname(report) == os.path.dirname(overlap.cache_path(private))
    assert stat.S_IMODE(os.stat(report).st_mode) == 0o600
    with config.unlocked():
        config.data.near_copy_threshold = 0.99999  # the edited copy passes
    with pytest.raises(PastTheBoundary):
        pipeline.train_and_evaluate(config, os.fspath(workdir))
    with config.unlocked():
        config.data.near_copy_threshold = 0.5
    with pytest.raises(ValueError, match=r"config.data.near_copy_threshold=0.5 must be a number in \[0.9, 1\]"):
        pipeline.train_and_evaluate(config, os.fspath(workdir))
