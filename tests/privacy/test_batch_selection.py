"""The DP stage's Poisson batch selection. Statistical tests state their false-alarm rate under a correct
sampler (all fixed seeds, so a pass is reproducible; the rates say how unlucky a seed would have to be)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dpwave.privacy import BatchOverflowError, PoissonSampler, PoissonSelection
from dpwave.privacy.batch_selection import choose_buckets

pytestmark = pytest.mark.unit

N, Q, STEPS = 2000, 64 / 2000, 2000


@pytest.fixture(scope="module")
def draws():
    sampler = PoissonSampler(N, Q, seed=7)
    return sampler, [sampler.batch(t) for t in range(STEPS)]


def test_mean_batch_size_within_4_standard_errors(draws):
    # False alarm: P(|Z| > 4) = 6.3e-5.
    sampler, batches = draws
    sizes = np.array([m.sum() for _, m in batches])
    se = np.sqrt(N * Q * (1 - Q) / STEPS)
    assert sampler.selection.expected_batch_size == pytest.approx(64.0)
    assert abs(sizes.mean() - N * Q) < 4 * se


def test_batch_size_variance_is_binomial(draws):
    # (T-1) s^2 / (N q (1-q)) ~ chi2(T-1) (normal approximation); two-sided, false alarm 1e-4.
    # A fixed-size (or shuffled) sampler has variance 0 and fails this.
    _, batches = draws
    sizes = np.array([m.sum() for _, m in batches], np.float64)
    statistic = (STEPS - 1) * sizes.var(ddof=1) / (N * Q * (1 - Q))
    lo, hi = stats.chi2.ppf([5e-5, 1 - 5e-5], STEPS - 1)
    assert lo < statistic < hi


def test_per_example_inclusion_frequencies(draws):
    _, batches = draws
    counts = np.zeros(N, np.int64)
    for idx, mask in batches:
        np.add.at(counts, idx[mask], 1)
    # Each count ~ Binomial(T, q), independent across examples. Pearson statistic ~ chi2(N) when
    # T q = 64 (normal approximation); two-sided, false alarm 1e-4. Too *uniform* counts fail too
    # (sampling without replacement across steps would).
    statistic = np.sum((counts - STEPS * Q) ** 2) / (STEPS * Q * (1 - Q))
    lo, hi = stats.chi2.ppf([5e-5, 1 - 5e-5], N)
    assert lo < statistic < hi
    # Every single count within exact binomial bounds; union bound: false alarm <= 1e-4.
    per = 1e-4 / N / 2
    low, high = stats.binom.ppf(per, STEPS, Q), stats.binom.isf(per, STEPS, Q)
    assert low <= counts.min() and counts.max() <= high


def test_padding_and_mask(draws):
    sampler, batches = draws
    for idx, mask in batches[:300]:
        assert idx.dtype == np.int32 and mask.dtype == np.bool_
        assert len(idx) in sampler.buckets and len(mask) == len(idx)
        k = int(mask.sum())
        assert mask[:k].all() and not mask[k:].any()  # real slots first
        assert len(idx) == min(b for b in sampler.buckets if b >= k)  # the smallest bucket that fits
        real = idx[:k]
        assert np.all(np.diff(real) > 0) and (k == 0 or (real[0] >= 0 and real[-1] < N))
        assert not idx[k:].any()


def test_deterministic_from_seed_and_step(draws):
    _, batches = draws
    fresh = PoissonSampler(N, Q, seed=7)
    for t in (0, 1, 1234, STEPS - 1):
        for a, b in zip(fresh.batch(t), batches[t]):
            np.testing.assert_array_equal(a, b)
    other_seed = PoissonSampler(N, Q, seed=8)
    assert not np.array_equal(other_seed.batch(3)[0], batches[3][0])
    sets = {tuple(idx[mask]) for idx, mask in batches[:200]}
    assert len(sets) == 200  # different steps differ


def test_at_most_two_compiled_shapes(draws):
    sampler, batches = draws
    traces = []

    @jax.jit
    def masked_sum(indices, mask):
        traces.append(indices.shape)
        return jnp.sum(jnp.where(mask, indices, 0))

    for idx, mask in batches[:400]:
        assert int(masked_sum(idx, mask)) == int(idx[mask].sum())
    assert len(sampler.buckets) <= 2 and len(traces) <= 2
    assert {s[0] for s in traces} <= set(sampler.buckets)


def test_bucket_design():
    sampler = PoissonSampler(N, Q, seed=0)
    small, largest = sampler.buckets
    assert largest % 8 == 0 and small % 8 == 0
    # largest: the smallest multiple of 8 with P(size > largest) < 1e-12.
    assert stats.binom.sf(largest, N, Q) < 1e-12 <= stats.binom.sf(largest - 8, N, Q)
    assert sampler.overflow_prob == pytest.approx(stats.binom.sf(largest, N, Q), rel=1e-6)

    def expected_padded(b):
        return b * stats.binom.cdf(b, N, Q) + largest * stats.binom.sf(b, N, Q)

    assert all(expected_padded(small) <= expected_padded(b) for b in range(8, largest, 8))
    assert choose_buckets(100, 1.0, 104, 8) == (104,)  # q = 1: every draw is N, one bucket
    full = PoissonSampler(100, 1.0, seed=0)
    idx, mask = full.batch(5)
    np.testing.assert_array_equal(idx[mask], np.arange(100))


def test_overflow_raises_with_the_numbers():
    # tail_prob 0.3 accepts overflow on ~30% of steps; P(no overflow in 200 steps) < 1e-20.
    sampler = PoissonSampler(100, 0.5, seed=0, bucket_multiple=1, tail_prob=0.3)
    with pytest.raises(BatchOverflowError, match=r"exceeds the largest bucket 5\d \(N=100, q=0.5"):
        for t in range(200):
            sampler.batch(t)


def test_truncation():
    sampler = PoissonSampler(100, 0.5, seed=1, max_batch_size=48, truncate=True)
    assert sampler.truncated_max_batch_size == 48 == sampler.largest_bucket
    sizes = []
    for t in range(300):
        idx, mask = sampler.batch(t)
        sizes.append(int(mask.sum()))
        assert len(np.unique(idx[mask])) == mask.sum()
    # P(Binomial(100, .5) >= 48) = 0.69, so truncation happens on most steps.
    assert max(sizes) == 48 and sizes.count(48) > 150
    assert PoissonSampler(N, Q, seed=0).truncated_max_batch_size is None


def test_max_batch_size_below_tail_bound_needs_truncate():
    with pytest.raises(ValueError, match=r"max_batch_size=96 is below 128.*truncate=True"):
        PoissonSampler(N, Q, seed=0, max_batch_size=96)
    assert PoissonSampler(N, Q, seed=0, max_batch_size=256).buckets == (72, 128)
    with pytest.raises(ValueError, match="multiple of bucket_multiple=8"):
        PoissonSampler(N, Q, seed=0, max_batch_size=100, truncate=True)


@pytest.mark.parametrize("kwargs, match", [
    ({"sampling_prob": 0.0}, r"sampling_prob=0.0 must be a float in \(0, 1\]"),
    ({"sampling_prob": 1.5}, "sampling_prob=1.5"),
    ({"sampling_prob": True}, "sampling_prob=True"),
    ({"num_examples": 0}, r"num_examples=0 must be in \[1,"),
    ({"seed": -1}, "seed=-1 must be >= 0"),
    ({"bucket_multiple": 0}, "bucket_multiple=0"),
    ({"tail_prob": 0.0}, "tail_prob=0.0"),
])
def test_poisson_validation(kwargs, match):
    args = {"num_examples": N, "sampling_prob": Q, "seed": 0, **kwargs}
    with pytest.raises(ValueError, match=match):
        PoissonSampler(**args)
    with pytest.raises(ValueError, match="step=-1"):
        PoissonSampler(N, Q, seed=0).batch(-1)


def test_poisson_state_roundtrip():
    sampler = PoissonSampler(N, Q, seed=3, bucket_multiple=16, max_batch_size=160)
    state = json.loads(json.dumps(sampler.state_dict()))
    restored = PoissonSampler.from_state_dict(state)
    assert restored.fingerprint() == sampler.fingerprint()
    assert restored.fingerprint() != PoissonSampler(N, Q, seed=4).fingerprint()
    for a, b in zip(restored.batch(11), sampler.batch(11)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="buckets"):
        PoissonSampler.from_state_dict({**state, "buckets": [64, 160]})
    with pytest.raises(ValueError, match="'ShuffleSampler'"):
        PoissonSampler.from_state_dict({**state, "type": "ShuffleSampler"})


def test_selection_draws_its_sampler():
    sampler = PoissonSelection(N, Q).sampler(seed=7, bucket_multiple=16)
    assert (sampler.num_examples, sampler.sampling_prob, sampler.bucket_multiple) == (N, Q, 16)
    assert not sampler.truncate  # the accountant's untruncated Poisson event
    for a, b in zip(sampler.batch(3), PoissonSampler(N, Q, seed=7, bucket_multiple=16).batch(3)):
        np.testing.assert_array_equal(a, b)
