"""The privacy boundary: non-DP code refuses private data; private splits are not tagged public by mistake."""
from __future__ import annotations

import re
from collections.abc import Collection
from typing import Protocol

from absl import logging

from dpwave.data.errors import PrivacyError, PrivateSplitError
from dpwave.data.spec import DatasetSpec


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


def split_names(split: str) -> set[str]:
    """Base split names of a TFDS split expression: ``'train[:10%]+test'`` -> ``{'train', 'test'}``."""
    return {re.sub(r"\[.*\]$", "", part.strip()).strip() for part in split.split("+")}


def check_split_tag(spec: DatasetSpec, private_splits: Collection[str], private_by_default: Collection[str] = (),
                    role: str | None = None) -> None:
    """Refuses a spec that tags a split its builder declares private as public.

    ``private_splits`` are always private. ``private_by_default`` splits may be tagged public only with
    ``spec.override_private_default``, which is logged as a warning. ``role`` (``config.data.public``)
    names the spec in the messages.

    Raises:
      PrivateSplitError: one line naming the role, the split and the fix.
    """
    if spec.privacy != "public":
        return
    names = split_names(spec.split)
    where = f"{role} ({spec.label})" if role else spec.label
    always = sorted(names & set(private_splits))
    if always:
        raise PrivateSplitError(
            f"{where}: {spec.name} split(s) {always} hold private data but the spec tags {spec.label} "
            "privacy='public'; tag it privacy='private' (only the DP trainer may read it)")
    by_default = sorted(names & set(private_by_default))
    if by_default and not spec.override_private_default:
        fix = f"--{role}.override_private_default=True" if role else "DatasetSpec(override_private_default=True)"
        raise PrivateSplitError(
            f"{where} is tagged privacy='public' but {spec.name} declares split(s) {by_default} private by "
            f"default (they may hold the DP training set); use a public dataset or split, or set {fix} if "
            "it holds no private data")
    if by_default:
        logging.warning("%s: %s split(s) %s are private by default and tagged public by "
                        "override_private_default=True; the operator asserts they hold no private data",
                        where, spec.name, by_default)
