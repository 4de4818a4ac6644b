"""The project's SHA-256 fingerprints: of a config or a stage's inputs (canonical JSON, `config_fingerprint`) and
of a parameter pytree (`params_sha256`, for reproducibility logs and resume checks).

`params_sha256` hashes, for each leaf of `jax.tree.leaves(params)` in that (tree) order:

    header = f"{dtype.name}[{','.join(str(d) for d in shape)}]"   # ASCII, e.g. "float32[3,4]"
    sha.update(header.encode("ascii"))
    sha.update(little_endian_c_order_bytes)                        # prod(shape) * itemsize bytes

Typed PRNG keys are hashed through `jax.random.key_data` (so their dtype is uint32). The header
fixes each leaf's byte count, so the stream is unambiguous: two trees with the same hash have the
same leaves (dtype, shape and bytes) in the same order. The tree structure itself (dict keys, node
types) is NOT hashed: renaming a parameter does not change the fingerprint, reordering does.
"""

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

__all__ = ["config_fingerprint", "params_sha256"]


def _leaf_array(leaf: Any) -> np.ndarray:
    """Host copy of one leaf as a little-endian numpy array (shape kept, also for 0-d)."""
    if isinstance(leaf, jax.Array):
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        if not leaf.is_fully_addressable:
            raise ValueError(
                f"params_sha256 got an array of shape {leaf.shape} that is not fully addressable from"
                " this process; gather it first (jax.experimental.multihost_utils.process_allgather)"
                " or hash it on every process from a replicated copy.")
    array = np.asarray(leaf)
    if array.dtype.kind == "O":
        raise ValueError(f"params_sha256 cannot hash a leaf of type {type(leaf).__name__}; "
                         "params must hold only numeric arrays or scalars.")
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return array


def params_sha256(params: Any) -> str:
    """Hex SHA-256 of the parameter leaves in tree order; see the module docstring for the format."""
    sha = hashlib.sha256()
    for leaf in jax.tree.leaves(params):
        array = _leaf_array(leaf)
        header = f"{array.dtype.name}[{','.join(str(d) for d in array.shape)}]"
        sha.update(header.encode("ascii"))
        sha.update(array.tobytes(order="C"))
    return sha.hexdigest()


def config_fingerprint(config: Any) -> str:
    """SHA-256 of the canonical JSON of a config (sorted keys, no whitespace, ASCII).

    Accepts a mapping or anything with `to_dict()` (an `ml_collections.ConfigDict`).
    """
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise ValueError("config_fingerprint expects a mapping or a ConfigDict, got "
                         f"{type(config).__name__}.")
    try:
        canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                               allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"config is not canonical-JSON serializable ({e}); keep config values to "
                         "str/int/float/bool/None/lists/dicts (finite floats).") from e
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()
