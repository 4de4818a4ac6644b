"""Stage inputs as JSON and their fingerprint `inputs_sha256`.

A stage's inputs are the settings it reads (`Stage.inputs`, dataclasses from `dpwave.train.settings`) and the
fingerprints of the stages it consumes. They are written into every checkpoint and into the stage's summary, so
a finished stage is never reused, and an unfinished one never resumed, under different inputs
(`StaleStageError` names the changed fields).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any

from dpwave.train.hashing import config_fingerprint


class StaleStageError(ValueError):
    """A stage's recorded result or checkpoint was computed from other inputs than the current config gives."""


def jsonable(value: Any) -> Any:
    """Dataclasses, mappings and sequences as plain JSON values; non-finite floats as "Infinity"/"-Infinity"/"NaN".

    Dataclass fields with ``metadata={"fingerprint": False}`` (how a result is computed, not what it is, e.g.
    ``TransformerConfig.attention_impl``) are left out.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.metadata.get("fingerprint", True)}
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


def sha256(inputs: Mapping[str, Any]) -> str:
    """The fingerprint of JSON-ready `inputs` (canonical JSON, `hashing.config_fingerprint`)."""
    return config_fingerprint(dict(inputs))


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, Mapping) or not tree:
        return {prefix: tree}
    return {k: v for name, sub in tree.items()
            for k, v in _flatten(sub, f"{prefix}.{name}" if prefix else name).items()}


def without(inputs: Mapping[str, Any], paths: Iterable[str]) -> dict[str, Any]:
    """`inputs` (flattened to dotted paths) without the leaves at or below `paths`."""
    paths = tuple(paths)
    return {k: v for k, v in _flatten(inputs).items() if not any(k == p or k.startswith(p + ".") for p in paths)}


def changed(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """'path: recorded -> current' for every leaf that differs."""
    old, new = _flatten(recorded), _flatten(current)
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k)]
