"""InceptionV3 FID weights: a user-provided .npz of named float32 arrays.

Keys are the NNX variable paths joined by dots, which mirror the pytorch-fid state dict
(`Mixed_5b.branch1x1.conv.kernel`, `Mixed_5b.branch1x1.bn.scale`, `.bn.bias`, `.bn.mean`,
`.bn.var`). Conv kernels are HWIO (Flax layout). The logits layer (`fc`) is not stored:
FID uses the pool3 features. Build the file from pytorch-fid's checkpoint with
`python -m dpwave.evaluate.convert_inception_weights` (see WEIGHTS_HELP).
"""
from __future__ import annotations

import functools
import os
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpwave import files
from dpwave.evaluate.inception import INPUT_SIZE, InceptionV3, check_input_size

TORCH_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth")
WEIGHTS_HELP = (
    "The FID InceptionV3 weights cannot be downloaded by dpwave. On a machine with internet and "
    f"PyTorch: download {TORCH_WEIGHTS_URL} and convert it with `python -m "
    "dpwave.evaluate.convert_inception_weights pt_inception-2015-12-05-6726825d.pth "
    "inception_fid.npz`, then pass the .npz path. Without the weights, report the surrogate "
    "'FD-cls (surrogate, not FID)' instead.")

_BN_NAMES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


class InceptionWeightsError(ValueError):
    """The weights file is missing, unreadable, or does not match the FID InceptionV3."""


@functools.lru_cache(maxsize=1)
def _abstract() -> tuple[nnx.GraphDef, tuple]:
    graphdef, state = nnx.split(nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0))))
    return graphdef, tuple(nnx.to_flat_state(state))


def weight_shapes() -> dict[str, tuple[int, ...]]:
    """Every array the weights file must hold, by key, with its shape."""
    return {".".join(map(str, path)): tuple(var.shape) for path, var in _abstract()[1]}


def inception_from_arrays(arrays: Mapping[str, np.ndarray], *, input_size: int = INPUT_SIZE) -> InceptionV3:
    """Builds the network from named arrays, refusing missing, extra or misshapen ones."""
    check_input_size(input_size)
    graphdef, flat = _abstract()
    expected = {".".join(map(str, path)) for path, _ in flat}
    missing, extra = sorted(expected - set(arrays)), sorted(set(arrays) - expected)
    if missing or extra:
        raise InceptionWeightsError(
            f"weights do not match the FID InceptionV3: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(extra)} unexpected (e.g. {extra[:3]}). {WEIGHTS_HELP}")
    leaves = []
    for path, var in flat:
        key = ".".join(map(str, path))
        value = np.asarray(arrays[key])
        if value.shape != var.shape:
            raise InceptionWeightsError(f"weight {key} has shape {value.shape}, expected {var.shape}")
        if not np.all(np.isfinite(value)):
            raise InceptionWeightsError(f"weight {key} contains NaN or inf")
        leaves.append((path, var.replace(jnp.asarray(value, jnp.float32))))
    model = nnx.merge(graphdef, nnx.from_flat_state(leaves))
    model.input_size = input_size
    return model


def load_inception(path: str | os.PathLike, *, input_size: int = INPUT_SIZE) -> InceptionV3:
    """Loads the FID InceptionV3 from a weights .npz (see module docstring for the format)."""
    path = os.fspath(path)
    try:
        arrays = files.read_npz(path)
    except (FileNotFoundError, IsADirectoryError):
        raise InceptionWeightsError(f"InceptionV3 weights file not found: {path!r}. {WEIGHTS_HELP}") from None
    except (OSError, ValueError) as e:
        raise InceptionWeightsError(f"cannot read InceptionV3 weights {path!r} as .npz ({e}). {WEIGHTS_HELP}") from e
    return inception_from_arrays(arrays, input_size=input_size)


def inception_arrays(model: InceptionV3) -> dict[str, np.ndarray]:
    """The model's weights as the named float32 arrays of the weights file."""
    return {".".join(map(str, path)): np.asarray(var.get_value(), np.float32)
            for path, var in nnx.to_flat_state(nnx.state(model))}


def save_arrays(arrays: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Writes named arrays to `path` as .npz atomically (`dpwave.files`)."""
    files.write_npz(path, arrays, all_processes=True)


def arrays_from_torch_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Maps pytorch-fid's state dict (numpy values) to weight-file arrays.

    `X.conv.weight` (OIHW) -> `X.conv.kernel` (HWIO); `X.bn.{weight,bias,running_mean,
    running_var}` -> `X.bn.{scale,bias,mean,var}`; `num_batches_tracked` and the logits
    layer `fc.*` are dropped.
    """
    out = {}
    for key, value in state_dict.items():
        parts = key.split(".")
        if parts[0] == "fc" or parts[-1] == "num_batches_tracked":
            continue
        value = np.asarray(value, np.float32)
        if len(parts) >= 3 and parts[-2] == "conv" and parts[-1] == "weight" and value.ndim == 4:
            out[".".join(parts[:-1] + ["kernel"])] = value.transpose(2, 3, 1, 0)
        elif len(parts) >= 3 and parts[-2] == "bn" and parts[-1] in _BN_NAMES:
            out[".".join(parts[:-1] + [_BN_NAMES[parts[-1]]])] = value
        else:
            raise InceptionWeightsError(
                f"unexpected key {key!r} in the PyTorch state dict; expected pytorch-fid's "
                f"pt_inception-2015-12-05 checkpoint ({TORCH_WEIGHTS_URL})")
    return out
