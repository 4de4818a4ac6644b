"""Converts pytorch-fid's InceptionV3 checkpoint to dpwave's FID weights .npz.

Needs PyTorch (only here; dpwave itself never imports it):

    pip install torch   # CPU build is enough
    wget https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
    python -m dpwave.evaluate.convert_inception_weights pt_inception-2015-12-05-6726825d.pth inception_fid.npz

The output is checked against the network definition (every key and shape) before it is
written; pass its path to `dpwave.evaluate.fid(...)` or `load_inception(...)`.
"""
from __future__ import annotations

import argparse
import sys

from dpwave.evaluate.inception_weights import (
    arrays_from_torch_state_dict, inception_from_arrays, save_arrays)


def _load_torch_state_dict(path: str) -> dict:
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError as e:
        raise SystemExit("the converter needs PyTorch: pip install torch (CPU build is enough)") from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return {key: value.detach().cpu().numpy() for key, value in state.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("torch_checkpoint", help="pt_inception-2015-12-05-6726825d.pth")
    parser.add_argument("output", help="destination .npz")
    args = parser.parse_args(argv)
    arrays = arrays_from_torch_state_dict(_load_torch_state_dict(args.torch_checkpoint))
    inception_from_arrays(arrays)
    save_arrays(arrays, args.output)
    print(f"wrote {len(arrays)} arrays to {args.output}")


if __name__ == "__main__":
    main(sys.argv[1:])
