"""The privacy boundary: non-DP code refuses private data; private splits are not tagged public by mistake.

A spec's split is a TFDS split expression (``train``, ``train[:10%]``, ``train[10:20]``, ``public+heldout``,
``all``). It is resolved as TFDS resolves it, against the dataset's splits, into the base splits it reads
(``all`` is every split) BEFORE its privacy tag is checked, so no expression smuggles a private split into a
public role.
"""
from __future__ import annotations

from collections.abc import Collection, Iterator
from typing import Protocol

import tensorflow_datasets as tfds
from absl import logging

from dpwave.data.errors import PrivacyError, PrivateSplitError, SplitExpressionError
from dpwave.data.spec import DatasetSpec

SYNTAX = "'train', 'train[:10%]', 'train[10:20]', 'train[-5%:]', 'public+heldout', 'all'"


class _HasSpec(Protocol):
    spec: DatasetSpec


def require_public(source_or_spec: DatasetSpec | _HasSpec, consumer: str) -> None:
    """Raises ``PrivacyError`` unless the dataset is tagged public.

    Call it at the entry of everything that trains or fits without DP (tokenizer, refiner, AR
    pretraining, evaluation feature networks).
    """
    spec = source_or_spec if isinstance(source_or_spec, DatasetSpec) else source_or_spec.spec
    if spec.privacy != "public":
        raise PrivacyError(
            f"{consumer} trains without DP and must not read private dataset {spec.label}; only the DP "
            "trainer may read private data (through the Poisson sampler). Give it a dataset tagged "
            "privacy='public'.")


def _parse(split: str, where: str, splits: Collection[str]) -> tfds.core.splits.AbstractSplit:
    """``split`` parsed by TFDS' own parser (``ReadInstruction.from_spec``), or a one-line error."""
    try:
        return tfds.core.ReadInstruction.from_spec(split)
    except (ValueError, NotImplementedError) as e:
        why = str(e).strip().splitlines()[-1].split(". ")[0]  # tfds: "Error parsing ...\n<reason>. See ..."
        raise SplitExpressionError(
            f"{where}: cannot read split expression {split!r} ({why}); use TFDS syntax such as {SYNTAX} over "
            f"the splits {sorted(splits)}") from None


def _base_splits(instruction: tfds.core.splits.AbstractSplit, splits: Collection[str]) -> Iterator[str]:
    """The base split of every term of a parsed expression; ``all`` (or any term of an unknown kind, so that
    nothing is missed) stands for every split."""
    if isinstance(instruction, tfds.core.ReadInstruction):
        yield instruction.split_name
    elif hasattr(instruction, "left") and hasattr(instruction, "right"):  # 'a+b' (tfds' _SplitAdd)
        yield from _base_splits(instruction.left, splits)
        yield from _base_splits(instruction.right, splits)
    else:  # 'all' (tfds' _SplitAll, `tfds.Split.ALL`): the union of the dataset's splits
        yield from splits


def split_names(split: str, splits: Collection[str], where: str = "dataset") -> set[str]:
    """The base splits a TFDS split expression reads, given the dataset's ``splits``.

    ``'train[:10%]+test'`` -> ``{'train', 'test'}``; ``'all'`` -> every split. ``where`` names the dataset
    in messages.

    Raises:
      SplitExpressionError: one line, when the expression does not parse or names a split not in ``splits``.
    """
    names = set(_base_splits(_parse(split, where, splits), splits))
    unknown = sorted(names - set(splits))
    if unknown:
        raise SplitExpressionError(
            f"{where}: split expression {split!r} names unknown split(s) {unknown}; the valid splits are "
            f"{sorted(splits)} (or 'all' for every one)")
    return names


def check_split_tag(spec: DatasetSpec, splits: Collection[str], private_splits: Collection[str] = (),
                    private_by_default: Collection[str] = (), role: str | None = None) -> set[str]:
    """Resolves ``spec.split`` against the dataset's ``splits`` and refuses a public tag on any private split
    it reads.

    ``private_splits`` are always private. ``private_by_default`` splits may be tagged public only with
    ``spec.override_private_default``, which is logged as a warning. ``role`` (``config.data.public``)
    names the spec in the messages.

    Returns:
      The base splits ``spec.split`` reads.

    Raises:
      SplitExpressionError: the expression does not parse or names an unknown split (whatever the tag).
      PrivateSplitError: one line naming the role, the split and the fix.
    """
    where = f"{role} ({spec.label})" if role else spec.label
    names = split_names(spec.split, splits, where)
    if spec.privacy != "public":
        return names
    reads = "" if names == {spec.split} else f" (the expression {spec.split!r} reads {sorted(names)})"
    always = sorted(names & set(private_splits))
    if always:
        raise PrivateSplitError(
            f"{where}: {spec.name} split(s) {always} hold private data but the spec tags {spec.label} "
            f"privacy='public'{reads}; name only public splits, or tag it privacy='private' if it is the DP "
            "trainer's input (only the DP trainer may read it)")
    by_default = sorted(names & set(private_by_default))
    if by_default and not spec.override_private_default:
        fix = f"--{role}.override_private_default=True" if role else "DatasetSpec(override_private_default=True)"
        raise PrivateSplitError(
            f"{where} is tagged privacy='public' but {spec.name} declares split(s) {by_default} private by "
            f"default (they may hold the DP training set){reads}; use a public dataset or split, or set {fix} "
            "if it holds no private data")
    if by_default:
        logging.warning("%s: %s split(s) %s are private by default and tagged public by "
                        "override_private_default=True; the operator asserts they hold no private data",
                        where, spec.name, by_default)
    return names
