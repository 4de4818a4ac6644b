"""Poisson sampler: honesty (batch sizes, inclusion frequencies), padding waste and draw time.

Runs ``--steps`` draws for N = 2,000 (the mnist5k private split) and N = 1,000,000, both with
q N = 64, and prints one row per N. Side by side in the same run: padding of dpwave's two buckets
vs one bucket at the 1e-12 tail bound, and the draw time of ``PoissonSampler.batch`` (binomial
count + uniform subset) vs N direct Bernoulli coins.

    python -m experiments.bench.bench_sampler --out /tmp/bench_sampler.json
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from scipy import stats

from dpwave.privacy import PoissonSampler
from experiments.bench.common import print_table, write_json


def count_histogram_pvalue(counts: np.ndarray, steps: int, q: float) -> float:
    """Chi-square goodness of fit of per-example inclusion counts to Binomial(steps, q).

    Count values are pooled from both tails until every bin expects at least 5 examples.
    """
    n = counts.size
    support = np.arange(steps + 1)
    expected = n * stats.binom.pmf(support, steps, q)
    observed = np.bincount(counts, minlength=steps + 1).astype(np.float64)
    mode = int(np.argmax(expected))
    lo, hi = mode, mode
    while lo > 0 and expected[:lo].sum() >= 5:
        lo -= 1
    while hi < steps and expected[hi + 1:].sum() >= 5:
        hi += 1
    exp_bins = np.concatenate([[expected[:lo + 1].sum()], expected[lo + 1:hi], [expected[hi:].sum()]])
    obs_bins = np.concatenate([[observed[:lo + 1].sum()], observed[lo + 1:hi], [observed[hi:].sum()]])
    exp_bins, obs_bins = exp_bins[exp_bins > 0], obs_bins[exp_bins > 0]
    statistic = float(np.sum((obs_bins - exp_bins) ** 2 / exp_bins))
    return float(stats.chi2.sf(statistic, max(len(exp_bins) - 1, 1)))


def run(num_examples: int, steps: int, seed: int) -> dict[str, float]:
    q = 64 / num_examples
    sampler = PoissonSampler(num_examples, q, seed=seed)
    counts = np.zeros(num_examples, np.int64)
    sizes, slots = np.zeros(steps), np.zeros(steps)
    start = time.perf_counter()
    draws = [sampler.batch(t) for t in range(steps)]
    draw_us = (time.perf_counter() - start) / steps * 1e6
    for t, (idx, mask) in enumerate(draws):
        sizes[t], slots[t] = mask.sum(), len(idx)
        counts[idx[mask]] += 1
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for _ in range(steps):
        np.flatnonzero(rng.random(num_examples) < q)
    bernoulli_us = (time.perf_counter() - start) / steps * 1e6
    real = sizes.sum()
    variance = num_examples * q * (1 - q)
    return {
        "N": num_examples, "q": q, "qN": q * num_examples, "steps": steps,
        "buckets": list(sampler.buckets), "overflow_prob_per_step": sampler.overflow_prob,
        "mean_batch": float(sizes.mean()),
        "mean_minus_qN_in_se": float((sizes.mean() - q * num_examples) / np.sqrt(variance / steps)),
        "var_ratio": float(sizes.var(ddof=1) / variance),
        "inclusion_gof_p": count_histogram_pvalue(counts, steps, q),
        "padding_two_buckets": float((slots.sum() - real) / real),
        "padding_one_bucket": float((sampler.largest_bucket * steps - real) / real),
        "draw_us": draw_us, "bernoulli_us": bernoulli_us,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="/tmp/bench_sampler.json")
    args = parser.parse_args()
    rows = [run(n, args.steps, args.seed) for n in (2000, 1_000_000)]
    print_table(rows, ["N", "qN", "buckets", "mean_batch", "mean_minus_qN_in_se", "var_ratio",
                       "inclusion_gof_p", "padding_two_buckets", "padding_one_bucket", "draw_us",
                       "bernoulli_us"])
    write_json(args.out, "sampler", rows, steps=args.steps, seed=args.seed)


if __name__ == "__main__":
    main()
