"""Batch samplers, each a pure function of (seed, step) so a resumed run draws the same batches.

* ``PoissonSampler``: what the DP accountant assumes. At step t every example joins the batch
  independently with probability q. Output is padded to one of at most two fixed sizes (buckets)
  with a mask, so a jitted step compiles at most twice per run.
* ``ShuffleSampler``: fixed-size batches from a fresh permutation each epoch, for public
  (non-DP) training.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import math
from typing import Any

import numpy as np
from scipy import special

# Domain separation: the two samplers never share a random stream for the same seed.
_POISSON_STREAM = 0x504F4953
_SHUFFLE_STREAM = 0x53485546
_MAX_EXAMPLES = 2**31 - 1  # indices are int32


class BatchOverflowError(RuntimeError):
    """A Poisson draw exceeded the largest bucket and truncation is off."""


def _rng(seed: int, stream: int, counter: int) -> np.random.Generator:
    """A Philox generator keyed by (seed, stream, counter) through SeedSequence hashing."""
    return np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, stream, counter])))


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}={value!r} must be an int")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name}={value!r} must be {bound}")
    return int(value)


def _is_prob(value: Any) -> bool:
    """A real number in [0, 1] (bools excluded)."""
    return (not isinstance(value, bool) and isinstance(value, (int, float, np.floating))
            and 0.0 <= float(value) <= 1.0)


def _fingerprint(state: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:16]


def seed_commitment(seed: int) -> str:
    """HMAC-SHA256 keyed by the seed of a fixed message: equal seeds give equal commitments, and the
    commitment holds no copy of the seed (finding it means searching the whole seed space)."""
    key = _check_int("seed", seed, 0).to_bytes(32, "big")
    return hmac.new(key, b"dpwave.PoissonSampler.seed_commitment/1", hashlib.sha256).hexdigest()


def binomial_sf(k: Any, n: int, q: float) -> Any:
    """P(Binomial(n, q) > k), elementwise; exactly 0 for k >= n."""
    k = np.asarray(k)
    return np.where(k >= n, 0.0, special.bdtrc(np.minimum(k, n - 1), n, q))


def binomial_tail_cap(n: int, q: float, tail_prob: float) -> int:
    """Smallest c with P(Binomial(n, q) > c) < tail_prob (binary search on the exact survival)."""
    lo, hi = 0, n  # P(X > n) = 0 < tail_prob, so hi is always feasible
    while lo < hi:
        mid = (lo + hi) // 2
        if binomial_sf(mid, n, q) < tail_prob:
            hi = mid
        else:
            lo = mid + 1
    return lo


def choose_buckets(n: int, q: float, largest: int, multiple: int) -> tuple[int, ...]:
    """``(small, largest)`` minimizing the expected padded batch size, or ``(largest,)``.

    A draw of size k is padded to the smallest bucket >= k, so the expected padded size with a small
    bucket b is ``b * P(k <= b) + largest * P(k > b)``; b runs over multiples of ``multiple``.
    """
    candidates = np.arange(multiple, largest, multiple)
    if candidates.size == 0:
        return (largest,)
    cdf = 1.0 - binomial_sf(candidates, n, q)
    expected = candidates * cdf + largest * (1.0 - cdf)
    best = int(np.argmin(expected))
    return (int(candidates[best]), largest) if expected[best] < largest else (largest,)


class PoissonSampler:
    """Poisson sampling for DP-SGD: each example in each step's batch independently w.p. q.

    ``batch(step)`` draws the count ``k ~ Binomial(N, q)`` and then a uniformly random k-subset of
    the N indices. This is the same distribution over subsets as N independent Bernoulli(q) coins:
    under the coins, P(S) = q^|S| (1-q)^(N-|S|) depends on S only through |S|, so given |S| = k
    every k-subset is equally likely, and |S| ~ Binomial(N, q). It costs O(k) instead of O(N).
    The generator is Philox keyed by (seed, step) through ``SeedSequence``: batches are a pure
    function of (seed, step), independent across steps.

    Shapes: ``largest`` is the smallest multiple of ``bucket_multiple`` with
    P(Binomial(N, q) > largest) < ``tail_prob`` (default 1e-12 per step), or ``max_batch_size``.
    A second, smaller bucket is the multiple of ``bucket_multiple`` that minimizes the expected
    padded size (see ``choose_buckets``); each draw is padded to the smallest bucket that holds it,
    so a jitted step sees at most two shapes. For N=2000, q=0.032 (qN=64): buckets (72, 128).

    Overflow: a draw larger than ``largest`` raises ``BatchOverflowError`` unless ``truncate``;
    with ``truncate=True`` the batch is a uniformly random subset of ``truncated_max_batch_size``
    of the drawn examples, which is what dp_accounting's ``TruncatedSubsampledGaussianDpEvent``
    assumes. ``max_batch_size`` below the tail bound needs ``truncate=True``.

    Padded slots hold index 0 with mask False; normalize by ``expected_batch_size`` (q N, a public
    constant), never by the realized count.
    """

    def __init__(self, num_examples: int, sampling_prob: float, seed: int, bucket_multiple: int = 8,
                 max_batch_size: int | None = None, truncate: bool = False,
                 tail_prob: float = 1e-12):
        self.num_examples = _check_int("num_examples", num_examples, 1, _MAX_EXAMPLES)
        if not _is_prob(sampling_prob) or sampling_prob == 0:
            raise ValueError(f"sampling_prob={sampling_prob!r} must be a float in (0, 1]; for an "
                             "expected batch size B use B / num_examples")
        self.sampling_prob = float(sampling_prob)
        self.seed = _check_int("seed", seed, 0)
        self.bucket_multiple = _check_int("bucket_multiple", bucket_multiple, 1)
        if not _is_prob(tail_prob) or tail_prob in (0, 1):
            raise ValueError(f"tail_prob={tail_prob!r} must lie in (0, 1); it bounds P(overflow) per step")
        self.tail_prob = float(tail_prob)
        self.truncate = bool(truncate)
        m = self.bucket_multiple
        bound = binomial_tail_cap(self.num_examples, self.sampling_prob, self.tail_prob)
        largest = max(m, -(-bound // m) * m)
        self.max_batch_size = None
        if max_batch_size is not None:
            self.max_batch_size = _check_int("max_batch_size", max_batch_size, 1)
            if self.max_batch_size % m:
                raise ValueError(f"max_batch_size={max_batch_size} must be a multiple of "
                                 f"bucket_multiple={m}")
            if self.max_batch_size < largest and not self.truncate:
                raise ValueError(
                    f"max_batch_size={max_batch_size} is below {largest}, the size a Binomial(N="
                    f"{self.num_examples}, q={self.sampling_prob}) draw exceeds with probability < "
                    f"{self.tail_prob:g}; P(draw > {max_batch_size}) = "
                    f"{self._overflow_prob(self.max_batch_size):.3g} per step. Raise max_batch_size or "
                    "pass truncate=True (accounted as truncated Poisson sampling)")
            largest = min(largest, self.max_batch_size)
        self.buckets = choose_buckets(self.num_examples, self.sampling_prob, largest, m)

    @property
    def expected_batch_size(self) -> float:
        """q N: the public normalizer of summed clipped gradients."""
        return self.sampling_prob * self.num_examples

    @property
    def largest_bucket(self) -> int:
        return self.buckets[-1]

    @property
    def truncated_max_batch_size(self) -> int | None:
        """The truncation size the accountant must use, or None when batches are never truncated."""
        return self.largest_bucket if self.truncate else None

    @property
    def overflow_prob(self) -> float:
        """P(a step's draw exceeds the largest bucket)."""
        return self._overflow_prob(self.largest_bucket)

    def _overflow_prob(self, size: int) -> float:
        return float(binomial_sf(size, self.num_examples, self.sampling_prob))

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """Indices (int32[B], ascending real ones first, then 0-padding) and mask (bool[B]).

        Raises:
          BatchOverflowError: the draw exceeds the largest bucket and ``truncate`` is False.
        """
        step = _check_int("step", step, 0)
        rng = _rng(self.seed, _POISSON_STREAM, step)
        count = int(rng.binomial(self.num_examples, self.sampling_prob))
        if count > self.largest_bucket:
            if not self.truncate:
                raise BatchOverflowError(
                    f"step {step}: Poisson draw of {count} examples exceeds the largest bucket "
                    f"{self.largest_bucket} (N={self.num_examples}, q={self.sampling_prob}, expected "
                    f"{self.expected_batch_size:g}, P(overflow per step)={self.overflow_prob:.3g}); "
                    "lower tail_prob, raise max_batch_size, or pass truncate=True")
            # A uniform subset of a uniform subset is uniform: draw the truncated batch directly.
            count = self.largest_bucket
        chosen = np.sort(rng.choice(self.num_examples, size=count, replace=False))
        size = next(b for b in self.buckets if b >= count)
        indices = np.zeros(size, np.int32)
        indices[:count] = chosen
        mask = np.zeros(size, bool)
        mask[:count] = True
        return indices, mask

    def checkpoint_state(self) -> dict[str, Any]:
        """``state_dict()`` with the seed replaced by ``seed_commitment(seed)``: what checkpoints store, so a
        resume can check the draws without a plain copy of the (secret) seed on disk."""
        state = self.state_dict()
        state["seed_commitment"] = seed_commitment(state.pop("seed"))
        return state

    def state_dict(self) -> dict[str, Any]:
        """JSON-serializable config (the sampler has no other state). It holds the seed: checkpoints store
        ``checkpoint_state()`` instead."""
        return {"type": "PoissonSampler", "num_examples": self.num_examples,
                "sampling_prob": self.sampling_prob, "seed": self.seed,
                "bucket_multiple": self.bucket_multiple, "max_batch_size": self.max_batch_size,
                "truncate": self.truncate, "tail_prob": self.tail_prob, "buckets": list(self.buckets)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> PoissonSampler:
        """Rebuilds a sampler; refuses a state whose buckets this code would not reproduce."""
        if state.get("type") != "PoissonSampler":
            raise ValueError(f"state type {state.get('type')!r} is not 'PoissonSampler'")
        sampler = cls(state["num_examples"], state["sampling_prob"], state["seed"],
                      state["bucket_multiple"], state["max_batch_size"], state["truncate"],
                      state["tail_prob"])
        if list(sampler.buckets) != list(state["buckets"]):
            raise ValueError(f"restored buckets {state['buckets']} differ from recomputed "
                             f"{list(sampler.buckets)}; the sampler code changed since the checkpoint")
        return sampler

    def fingerprint(self) -> str:
        """Short hash of ``state_dict()``: equal fingerprints draw equal batches."""
        return _fingerprint(self.state_dict())


class ShuffleSampler:
    """Deterministic epochs for public training: epoch e uses a permutation keyed by (seed, e).

    With ``drop_remainder`` every batch has ``batch_size`` indices and the last ``N mod B`` of each
    permutation are skipped; otherwise each epoch ends with one shorter batch.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int, drop_remainder: bool = True):
        self.num_examples = _check_int("num_examples", num_examples, 1, _MAX_EXAMPLES)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.seed = _check_int("seed", seed, 0)
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
        return _check_int("step", step, 0) // self.steps_per_epoch

    def permutation(self, epoch: int) -> np.ndarray:
        """The int32 permutation of epoch ``epoch`` (the last one is memoized; safe to call from several threads:
        the memo is read and replaced as one (epoch, permutation) pair)."""
        epoch = _check_int("epoch", epoch, 0)
        memo = self._epoch_perm
        if memo is None or memo[0] != epoch:
            perm = _rng(self.seed, _SHUFFLE_STREAM, epoch).permutation(self.num_examples)
            memo = self._epoch_perm = (epoch, perm.astype(np.int32))
        return memo[1]

    def batch(self, step: int) -> np.ndarray:
        """int32 indices of step ``step``."""
        epoch, position = divmod(_check_int("step", step, 0), self.steps_per_epoch)
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
