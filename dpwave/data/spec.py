"""``DatasetSpec``: what to load, from where, and under which privacy tag."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

PRIVACY_TAGS = ("public", "private")
Privacy = Literal["public", "private"]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A dataset split plus its privacy tag.

    Attributes:
      name: a dpwave builder (``mnist5k``, ``mm_celeba_hq``, ``coco_captions``, ``image_folder``) or any
        TFDS name, optionally with a config (``celeb_a``, ``cifar10``, ``mnist``, ``foo/config``).
      split: a TFDS split expression (``train``, ``private``, ``train[:90%]``, ``public+heldout``).
      privacy: ``"public"`` or ``"private"``. Required: only the DP trainer may read private data.
      data_dir: where prepared datasets live (default: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
      manual_dir: the raw release to build from (``mm_celeba_hq``, ``coco_captions``, ``image_folder``).
      resolution: square output size; selects the build config of the caption/folder builders and
        center-crops + resizes at read time otherwise. ``None`` keeps the stored size.
      channels: 1 or 3 to convert at read time; ``None`` keeps the stored channels.
      in_memory: decode the whole split once into numpy arrays (fast ``get_batch`` for small sets).
      labels: keep only the examples whose ``label`` is one of these (e.g. a public subset of the
        classes); ``None`` keeps every example. Filtering reads every label of the split once.
      override_private_default: tag ``public`` a split its builder declares private by default (the
        ``train`` split of ``mm_celeba_hq`` and ``coco_captions``, every split of ``image_folder``):
        you assert it holds no private data. Logged as a warning; without it such a tag is refused.
        Splits that are always private (``mnist5k/private``) stay refused.
    """

    name: str
    split: str
    privacy: Privacy
    data_dir: str | None = None
    manual_dir: str | None = None
    resolution: int | None = None
    channels: int | None = None
    in_memory: bool = False
    labels: tuple[int, ...] | None = None
    override_private_default: bool = False

    def __post_init__(self) -> None:
        if self.privacy not in PRIVACY_TAGS:
            raise ValueError(
                f"privacy={self.privacy!r} for dataset {self.name!r}: set privacy to 'public' or "
                "'private' (it is required; tag anything you may not train on without DP 'private')")
        for field in ("name", "split"):
            value = getattr(self, field)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{field}={value!r} must be a non-empty string")
        if self.resolution is not None and (
            isinstance(self.resolution, bool) or not isinstance(self.resolution, int)
            or self.resolution < 1):
            raise ValueError(f"resolution={self.resolution!r} must be a positive int or None")
        if self.channels not in (None, 1, 3):
            raise ValueError(f"channels={self.channels!r} must be 1, 3 or None (keep the stored channels)")
        for field in ("in_memory", "override_private_default"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"{field}={getattr(self, field)!r} must be True or False")
        if self.labels is not None:
            labels = tuple(self.labels) if isinstance(self.labels, (list, tuple)) else ()
            if not labels or any(isinstance(v, bool) or not isinstance(v, int) for v in labels):
                raise ValueError(f"labels={self.labels!r} must be a non-empty list of int class ids or None")
            object.__setattr__(self, "labels", labels)

    @property
    def label(self) -> str:
        """``name/split``, for messages."""
        return f"{self.name}/{self.split}"

    @classmethod
    def from_config(cls, config: Any) -> DatasetSpec:
        """Builds a spec from an ``ml_collections.ConfigDict`` or a mapping; unknown keys are errors."""
        if hasattr(config, "to_dict"):
            config = config.to_dict()
        if not isinstance(config, Mapping):
            raise ValueError(f"dataset config must be a ConfigDict or a mapping, got {type(config).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - set(fields))
        if unknown:
            raise ValueError(f"unknown dataset config keys {unknown}; valid keys are {sorted(fields)}")
        missing = [n for n, f in fields.items()
                   if f.default is dataclasses.MISSING and config.get(n) is None]
        if missing:
            raise ValueError(f"dataset config is missing required keys {missing} (privacy is 'public' or "
                             "'private')")
        return cls(**dict(config))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serializable dict; ``from_config(spec.to_dict()) == spec``."""
        out = dataclasses.asdict(self)
        out["labels"] = None if self.labels is None else list(self.labels)
        return out
