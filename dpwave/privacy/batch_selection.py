"""Batch selection of the DP stage: Poisson sampling, what the accountant assumes.

`PoissonSelection` is the public description (N, q) that the mechanism carries; `selection.sampler(seed)` is
the `PoissonSampler` that draws it with the secret seed. At step t every example joins the batch independently
with probability q; the draws are a pure function of (seed, step), so a resumed run draws the same batches.
Output is padded to one of at most two fixed sizes (buckets) with a mask, so a jitted step compiles at most
twice per run. Numpy and scipy only: the privacy package loads no data pipeline.
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
from typing import Any

import numpy as np
from scipy import special

from dpwave.validation import int_in_range

_POISSON_STREAM = 0x504F4953  # keeps the draws apart from any other stream keyed by the same seed
_MAX_EXAMPLES = 2**31 - 1  # indices are int32


def _is_prob(value: Any) -> bool:
    """A real number in [0, 1] (bools excluded)."""
    return (not isinstance(value, bool) and isinstance(value, (int, float, np.floating))
            and 0.0 <= float(value) <= 1.0)


def seed_commitment(seed: int) -> str:
    """HMAC-SHA256 keyed by the seed of a fixed message: equal seeds give equal commitments, and the
    commitment holds no copy of the seed (finding it means searching the whole seed space)."""
    key = int_in_range("seed", seed, 0).to_bytes(32, "big")
    return hmac.new(key, b"dpwave.PoissonSampler.seed_commitment/1", hashlib.sha256).hexdigest()


class BatchOverflowError(RuntimeError):
    """A Poisson draw exceeded the largest bucket and truncation is off."""


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

    Padded slots hold index 0 with mask False; normalize by ``selection.expected_batch_size`` (q N, a
    public constant), never by the realized count.
    """

    def __init__(self, num_examples: int, sampling_prob: float, seed: int, bucket_multiple: int = 8,
                 max_batch_size: int | None = None, truncate: bool = False,
                 tail_prob: float = 1e-12):
        self.num_examples = int_in_range("num_examples", num_examples, 1, _MAX_EXAMPLES)
        if not _is_prob(sampling_prob) or sampling_prob == 0:
            raise ValueError(f"sampling_prob={sampling_prob!r} must be a float in (0, 1]; for an "
                             "expected batch size B use B / num_examples")
        self.sampling_prob = float(sampling_prob)
        self.seed = int_in_range("seed", seed, 0)
        self.bucket_multiple = int_in_range("bucket_multiple", bucket_multiple, 1)
        if not _is_prob(tail_prob) or tail_prob in (0, 1):
            raise ValueError(f"tail_prob={tail_prob!r} must lie in (0, 1); it bounds P(overflow) per step")
        self.tail_prob = float(tail_prob)
        self.truncate = bool(truncate)
        m = self.bucket_multiple
        bound = binomial_tail_cap(self.num_examples, self.sampling_prob, self.tail_prob)
        largest = max(m, -(-bound // m) * m)
        self.max_batch_size = None
        if max_batch_size is not None:
            self.max_batch_size = int_in_range("max_batch_size", max_batch_size, 1)
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
    def selection(self) -> PoissonSelection:
        """What this sampler draws (its q N is the public normalizer of summed clipped gradients)."""
        return PoissonSelection(self.num_examples, self.sampling_prob)

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
        step = int_in_range("step", step, 0)
        rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([self.seed, _POISSON_STREAM, step])))
        count = int(rng.binomial(self.num_examples, self.sampling_prob))
        if count > self.largest_bucket:
            if not self.truncate:
                raise BatchOverflowError(
                    f"step {step}: Poisson draw of {count} examples exceeds the largest bucket "
                    f"{self.largest_bucket} (N={self.num_examples}, q={self.sampling_prob}, expected "
                    f"{self.selection.expected_batch_size:g}, P(overflow per step)={self.overflow_prob:.3g}); "
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
        return hashlib.sha256(json.dumps(self.state_dict(), sort_keys=True).encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class PoissonSelection:
    """Each of `dataset_size` examples joins each step independently with probability `sampling_prob`."""

    dataset_size: int
    sampling_prob: float

    @property
    def expected_batch_size(self) -> float:
        """q N: the public normalizer of the noised sum (never the realized batch size, which is private)."""
        return self.sampling_prob * self.dataset_size

    def sampler(self, seed: int, bucket_multiple: int = 8) -> PoissonSampler:
        """The sampler that draws this selection with the secret `seed` (never truncated: an overflow stops the run)."""
        return PoissonSampler(self.dataset_size, self.sampling_prob, seed=seed, bucket_multiple=bucket_multiple)
