"""The privacy boundary: non-DP code refuses private data; private splits cannot be tagged public."""
from __future__ import annotations

import re
from collections.abc import Collection
from typing import Protocol

from dpwave.data.errors import PrivacyError
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


def check_split_tag(spec: DatasetSpec, private_splits: Collection[str]) -> None:
    """Refuses a spec that tags a split the builder declares private as public."""
    leaked = sorted(split_names(spec.split) & set(private_splits))
    if leaked and spec.privacy == "public":
        raise PrivacyError(
            f"{spec.name} split(s) {leaked} hold private data but the spec tags {spec.label} "
            "privacy='public'; tag it privacy='private' (only the DP trainer may read it)")
