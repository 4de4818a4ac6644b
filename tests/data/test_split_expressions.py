"""Split expressions are resolved as TFDS resolves them (`all`, `a+b`, slices) before their privacy tag is checked."""
import logging
import os
import re

import pytest

from dpwave.data import DataError, DatasetSpec, PrivateSplitError, SplitExpressionError, load
from dpwave.data.boundary import split_names
from dpwave.data.builders import BUILDERS, Mnist5k

pytestmark = pytest.mark.unit

ROLE = "config.data.public"
MNIST5K = Mnist5k.SPLITS
# Every one reads mnist5k's private split (`all` is every split; TFDS allows spaces around '+').
READS_PRIVATE = ["all", "public+all", "all+heldout", "public+private", "public + private[:10]", "private[:1%]",
                 "heldout+private[-5%:]", "private[10:20]+test", "private[0shard]"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    return os.fspath(tmp_path_factory.mktemp("tfds"))


@pytest.mark.parametrize("expression, names", [
    ("all", set(MNIST5K)), ("public+all", set(MNIST5K)), ("public", {"public"}), ("public[:10%]", {"public"}),
    ("public[10:20]+heldout[-5%:]", {"public", "heldout"}), ("public + heldout", {"public", "heldout"}),
    ("test[1shard]", {"test"}), ("private[:50%]+private[50%:]", {"private"})])
def test_expressions_resolve_to_the_base_splits_tfds_reads(expression, names):
    assert split_names(expression, MNIST5K) == names


@pytest.mark.parametrize("expression, match", [
    ("validation", r"names unknown split\(s\) \['validation'\]; the valid splits are "
                   r"\['heldout', 'private', 'public', 'test'\]"),
    ("public+Private[:5]", r"unknown split\(s\) \['Private'\]"),
    ("all[:50%]", r"cannot read split expression 'all\[:50%\]' \('all' does not support slice\)"),
    ("public[abc]", r"cannot read split expression 'public\[abc\]'.*\['heldout', 'private', 'public', 'test'\]"),
    ("public[:150%]", r"percent slice boundaries should be in \[-100, 100\]"),
    ("public+", "cannot read split expression")])
def test_unknown_splits_and_bad_syntax_are_one_line_errors_naming_the_splits(expression, match):
    with pytest.raises(SplitExpressionError, match=match) as info:
        split_names(expression, MNIST5K, "mnist5k/x")
    assert "\n" not in str(info.value) and str(info.value).startswith("mnist5k/x: ")


@pytest.mark.parametrize("expression", READS_PRIVATE)
def test_public_role_reading_the_private_split_through_an_expression_is_refused(expression, tmp_path):
    data_dir = os.fspath(tmp_path / "tfds")
    with pytest.raises(PrivateSplitError) as info:
        load(DatasetSpec("mnist5k", expression, "public", data_dir=data_dir), role=ROLE)
    message = str(info.value)
    assert "\n" not in message
    assert f"{ROLE} (mnist5k/{expression}): mnist5k split(s) ['private'] hold private data" in message
    # Refused before anything is built.
    assert not os.path.exists(os.path.join(data_dir, "mnist5k"))


def test_always_private_split_in_all_ignores_the_override(tmp_path):
    data_dir = os.fspath(tmp_path / "tfds")
    with pytest.raises(PrivateSplitError, match=r"the expression 'all' reads \['heldout', 'private', 'public', "
                                                 r"'test'\]"):
        load(DatasetSpec("mnist5k", "all", "public", data_dir=data_dir, override_private_default=True), role=ROLE)


def test_unknown_split_is_refused_before_building(tmp_path):
    data_dir = os.fspath(tmp_path / "tfds")
    with pytest.raises(SplitExpressionError, match=r"config.data.test \(mnist5k/validation\): .*valid splits are"):
        load(DatasetSpec("mnist5k", "validation", "private", data_dir=data_dir), role="config.data.test")
    assert not os.path.exists(os.path.join(data_dir, "mnist5k"))


def test_public_expressions_and_private_all_load_what_tfds_reads(data_dir):
    assert len(load(DatasetSpec("mnist5k", "public+heldout[:10%]", "public", data_dir=data_dir))) == 1550
    assert len(load(DatasetSpec("mnist5k", "all", "private", data_dir=data_dir))) == 5000


def test_every_builder_declares_the_splits_it_builds(data_dir, monkeypatch):
    for cls in BUILDERS.values():
        assert cls.SPLITS and set(cls.PRIVATE_SPLITS + cls.PRIVATE_BY_DEFAULT) <= set(cls.SPLITS), cls.name
    load(DatasetSpec("mnist5k", "public", "public", data_dir=data_dir))
    monkeypatch.setattr(Mnist5k, "SPLITS", ("public", "private", "heldout"))
    with pytest.raises(DataError, match=r"has split\(s\) \['test'\] that its builder does not declare"):
        load(DatasetSpec("mnist5k", "public", "public", data_dir=data_dir))


@pytest.mark.parametrize("name, tree, reads", [
    ("mm_celeba_hq", "celeba_tree", "['test', 'train']"), ("coco_captions", "coco_tree", "['train', 'validation']"),
    ("image_folder", "class_folder", "['test', 'train']"), ("image_folder", "caption_folder", "['train']")])
def test_all_of_a_builder_with_private_by_default_splits_needs_the_override(name, tree, reads, request, tmp_path,
                                                                            caplog):
    def spec(**kw):
        return DatasetSpec(name, "all", "public", data_dir=os.fspath(tmp_path / "tfds"),
                           manual_dir=os.fspath(request.getfixturevalue(tree)), resolution=8, **kw)

    with pytest.raises(PrivateSplitError, match=rf"private by default .*the expression 'all' reads {re.escape(reads)}"
                                                rf".*--{ROLE}.override_private_default=True"):
        load(spec(), role=ROLE)
    with caplog.at_level(logging.WARNING):
        source = load(spec(override_private_default=True), role=ROLE)
    assert len(source) > 0 and any("override_private_default=True" in r.getMessage() for r in caplog.records)


def test_image_folder_without_split_folders_has_only_train(caption_folder, tmp_path):
    with pytest.raises(SplitExpressionError, match=r"unknown split\(s\) \['test'\]; the valid splits are \['train'\]"):
        load(DatasetSpec("image_folder", "test", "private", data_dir=os.fspath(tmp_path / "tfds"),
                         manual_dir=os.fspath(caption_folder), resolution=8))
