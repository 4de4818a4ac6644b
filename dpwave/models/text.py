"""Captions as model input: UTF-8 bytes padded to a fixed length.

The text encoder of the AR transformer reads bytes 0..255 plus one padding id
(``TEXT_PAD`` = 256), so any caption in any language needs no vocabulary file.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

TEXT_PAD = 256
TEXT_VOCAB_SIZE = 257


def encode_captions(captions: Sequence[str], max_len: int) -> np.ndarray:
    """Encodes captions as ``int32[len(captions), max_len]`` UTF-8 bytes, padded with ``TEXT_PAD``.

    Captions longer than ``max_len`` bytes are truncated (a split multi-byte
    character at the end is dropped by ``decode_caption``).
    """
    if isinstance(captions, str):
        raise ValueError(
            f"captions must be a sequence of strings, got the single string {captions!r}; wrap it in a list"
        )
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    out = np.full((len(captions), max_len), TEXT_PAD, dtype=np.int32)
    for i, caption in enumerate(captions):
        if not isinstance(caption, str):
            raise ValueError(f"caption {i} is a {type(caption).__name__}, expected str")
        data = np.frombuffer(caption.encode("utf-8")[:max_len], dtype=np.uint8)
        out[i, : data.size] = data
    return out


def decode_caption(row: np.ndarray) -> str:
    """Inverse of ``encode_captions`` for one row (padding removed)."""
    data = np.asarray(row)
    return bytes(data[data != TEXT_PAD].astype(np.uint8).tolist()).decode("utf-8", errors="ignore")
