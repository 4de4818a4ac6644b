"""Batch sampling for public (non-DP) training.

``ShuffleSampler``: fixed-size batches from a fresh permutation each epoch, a pure function of (seed, step) so a
resumed run draws the same batches. The DP stage's Poisson sampling lives with the mechanism, in
`dpwave.privacy.batch_selection`.
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import numpy as np

from dpwave.validation import int_in_range

_SHUFFLE_STREAM = 0x53485546  # never shares a random stream with the Poisson draws of the same seed
_MAX_EXAMPLES = 2**31 - 1  # indices are int32


def _rng(seed: int, stream: int, counter: int) -> np.random.Generator:
    """A Philox generator keyed by (seed, stream, counter) through SeedSequence hashing."""
    return np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, stream, counter])))


def _fingerprint(state: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:16]


class ShuffleSampler:
    """Deterministic epochs for public training: epoch e uses a permutation keyed by (seed, e).

    With ``drop_remainder`` every batch has ``batch_size`` indices and the last ``N mod B`` of each
    permutation are skipped; otherwise each epoch ends with one shorter batch.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int, drop_remainder: bool = True):
        self.num_examples = int_in_range("num_examples", num_examples, 1, _MAX_EXAMPLES)
        self.batch_size = int_in_range("batch_size", batch_size, 1)
        self.seed = int_in_range("seed", seed, 0)
        self.drop_remainder = bool(drop_remainder)
        if self.drop_remainder and self.batch_size > self.num_examples:
            raise ValueError(f"batch_size={batch_size} exceeds num_examples={num_examples}; with "
                             "drop_remainder=True no batch would be produced")
        self._epoch_perm: tuple[int, np.ndarray] | None = None

    @property
    def steps_per_epoch(self) -> int:
        if self.drop_remainder:
            return self.num_examples // self.batch_size
        return math.ceil(self.num_examples / self.batch_size)

    def epoch(self, step: int) -> int:
        """The epoch that ``step`` falls in."""
        return int_in_range("step", step, 0) // self.steps_per_epoch

    def permutation(self, epoch: int) -> np.ndarray:
        """The int32 permutation of epoch ``epoch`` (the last one is memoized; safe to call from several threads:
        the memo is read and replaced as one (epoch, permutation) pair)."""
        epoch = int_in_range("epoch", epoch, 0)
        memo = self._epoch_perm
        if memo is None or memo[0] != epoch:
            perm = _rng(self.seed, _SHUFFLE_STREAM, epoch).permutation(self.num_examples)
            memo = self._epoch_perm = (epoch, perm.astype(np.int32))
        return memo[1]

    def batch(self, step: int) -> np.ndarray:
        """int32 indices of step ``step``."""
        epoch, position = divmod(int_in_range("step", step, 0), self.steps_per_epoch)
        start = position * self.batch_size
        return self.permutation(epoch)[start: start + self.batch_size]

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable config (the sampler has no other state)."""
        return {"type": "ShuffleSampler", "num_examples": self.num_examples,
                "batch_size": self.batch_size, "seed": self.seed,
                "drop_remainder": self.drop_remainder}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> ShuffleSampler:
        if state.get("type") != "ShuffleSampler":
            raise ValueError(f"state type {state.get('type')!r} is not 'ShuffleSampler'")
        return cls(state["num_examples"], state["batch_size"], state["seed"], state["drop_remainder"])

    def fingerprint(self) -> str:
        """Short hash of ``state_dict()``."""
        return _fingerprint(self.state_dict())
