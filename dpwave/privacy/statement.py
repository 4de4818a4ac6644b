"""The privacy guarantee of a ledger, as a JSON-ready report and a human-readable statement.

`DEFAULT_NOT_COVERED` is the one list of what the guarantee does not cover: docs/privacy.md's
"What is NOT covered" bullets are these strings (tests/privacy/test_statement.py checks it).
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from dp_accounting import dp_event

from dpwave.privacy.accounting import truncation_probability
from dpwave.privacy.ledger import PrivacyLedger

DEFAULT_NOT_COVERED = (
    "Public data and everything trained on it without DP: pretraining data, the tokenizer (trained on public "
    "data; the DP stage only applies it to each private image), AR pretraining, the refiner and the evaluation "
    "classifiers.",
    "Hyperparameter tuning, model selection and repeated runs on the private data: this statement covers one "
    "run, and every extra run spends its own epsilon.",
    "The dataset size N and the DP hyperparameters: they are treated as public and written out (q = expected "
    "batch size / N). Under add-or-remove-one, whoever knows every other example learns from the published N "
    "whether one more is in the set; `dp.mechanism.neighboring=replace_one` keeps N the same on both sides.",
    "Sampling prompts: covered only because they are public, either balanced class labels or captions of the "
    "held-out split (the `sample` stage refuses any other caption source); the `sampling prompts` line of "
    "`privacy_statement.txt` names them.",
    "The memorization check: the `evaluate` stage reads the private images to compute `memorization_ratio` "
    "(in `metrics.json` and `report.md`). It is an operator-side diagnostic for the data owner and not DP: do "
    "not publish it as part of a DP release.",
    "Training metrics of the DP stage (loss, fraction clipped, realized batch size, non-finite count): they "
    "are computed from private data without noise. They are off by default (`dp.operations.log_private_metrics=False`: "
    "only epsilon is logged); turning them on leaks outside the guarantee.",
    "Secrecy of the DP seed: the Poisson draws, the noise and the per-example randomness of the DP stage come "
    "from one secret (at least 128 bits for a new run; every stream depends on all its bits), and whoever knows "
    "it, or holds the DP stage's directory (it may hold the drawn secret), can undo the sampling and the noise. "
    "Publish parameters, never the workdir. The `sampling and noise seed` line says where this run's secret came "
    "from and its size; `dp.secret.seed` (reproducibility mode) is NOT secret.",
    "Timing and other side channels: the DP stage's wall time depends on the Poisson draws (batch sizes, "
    "padding buckets), so it is kept out of `summary.json`, `metrics.json` and `report.md` (the operator finds "
    "it in the DP stage's owner-only `private_timing.json`, e.g. `dp_finetune/private_timing.json`); the DP stage's "
    "step timestamps sit only in "
    "owner-only files (the run log `log.txt`, the stage directory's metrics and TensorBoard events): publish "
    "none of them. Memory use and floating-point effects are not covered either.",
)

_RELATIONS = {
    "add_or_remove_one": (
        "add or remove one example of the private training set",
        "under add-or-remove-one the published N differs between the two neighbours, so the guarantee protects "
        "what one example contributes to the model, not whether N counts it; `dp.mechanism.neighboring=replace_one` "
        "(PLD only) keeps N fixed at a larger epsilon"),
    "replace_one": (
        "replace one example of the private training set by another (the dataset size N stays the same)",
        "under replace-one N is the same on both neighbours, so publishing it reveals nothing about one example"),
}


def _mechanism(event: dp_event.SelfComposedDpEvent) -> dict:
    inner = event.event
    if isinstance(inner, dp_event.TruncatedSubsampledGaussianDpEvent):
        return {"steps": event.count, "noise_multiplier": inner.noise_multiplier,
                "sampling_prob": inner.sampling_probability,
                "dataset_size": inner.dataset_size,
                "max_batch_size": inner.truncated_batch_size}
    if isinstance(inner, dp_event.PoissonSampledDpEvent) and isinstance(
            inner.event, dp_event.GaussianDpEvent):
        return {"steps": event.count, "noise_multiplier": inner.event.noise_multiplier,
                "sampling_prob": inner.sampling_probability}
    return {"steps": event.count, "event": repr(inner)}


_POISSON = ("Poisson: each example joins each step independently with probability sampling_prob; the draws are a "
            "deterministic function of (seed, step)")
_EVERY_EXAMPLE = "none: every example of the private set enters the one release (q = 1)"

# What a mechanism's steps are called and what each step noises, by `release` (the mechanisms share one DpEvent:
# a Gaussian on a sum whose per-example contributions have L2 norm at most C).
RELEASES = {
    "dp_sgd": ("DP-SGD steps", "the sum of per-example gradients clipped to L2 norm C"),
    "mean_embedding": ("release(s) of a mean embedding (DP-MERF)",
                       "the sum of per-example random-feature embeddings, each of L2 norm 1 by construction and "
                       "clipped to C = 1, then divided by N"),
}


def describe_step(event: dp_event.DpEvent, release: str = "dp_sgd") -> tuple[str, str]:
    """(sampling, mechanism): the statement's sentences for the DpEvent of one step, read from the event the
    accountant composes so the words cannot drift from the accounting. An event without sentences here is
    refused rather than described as something it is not."""
    gaussian = f"Gaussian noise of std noise_multiplier * C added once per step to {RELEASES[release][1]}"
    if isinstance(event, dp_event.PoissonSampledDpEvent) and isinstance(event.event, dp_event.GaussianDpEvent):
        return (_EVERY_EXAMPLE if event.sampling_probability == 1 else _POISSON), gaussian
    if isinstance(event, dp_event.TruncatedSubsampledGaussianDpEvent):
        return (f"{_POISSON}; a draw larger than {event.truncated_batch_size} examples is cut to a uniformly random "
                "subset of that size", gaussian)
    raise ValueError(f"the privacy statement cannot describe the DP event {event!r}: add its sentences to "
                     "dpwave/privacy/statement.py (describe_step) before reporting a guarantee for it")


def privacy_report(ledger: PrivacyLedger, not_covered: Sequence[str] = DEFAULT_NOT_COVERED,
                   release: str = "dp_sgd") -> dict:
    """The privacy guarantee of a ledger as a JSON-ready dict; `release` names the mechanism (`RELEASES`)."""
    if release not in RELEASES:
        raise ValueError(f"release={release!r}; use one of {tuple(RELEASES)}")
    p = ledger.params
    sampling, mechanism = describe_step(p.step_event(), release)
    truncation = None
    if p.max_batch_size is not None and p.max_batch_size < p.dataset_size:
        truncation = {
            "max_batch_size": p.max_batch_size,
            "truncation_probability_per_step": truncation_probability(
                p.dataset_size, p.sampling_prob, p.max_batch_size),
            "analysis": ("TruncatedSubsampledGaussianDpEvent (random-subset truncation)"
                         if p.accountant == "pld" else
                         "untruncated RDP + total-variation coupling of the truncation")}
    return {
        "epsilon": ledger.epsilon(),
        "delta": p.delta,
        "target_epsilon": p.target_epsilon,
        "steps": ledger.steps,
        "noise_multiplier": p.noise_multiplier,
        "sampling_prob": p.sampling_prob,
        "dataset_size": p.dataset_size,
        "expected_batch_size": None if p.selection is None else p.selection.expected_batch_size,
        "accountant": p.accountant,
        "pld_discretization": p.pld_discretization if p.accountant == "pld" else None,
        "neighboring": p.neighboring,
        "neighboring_relation": _RELATIONS[p.neighboring][0],
        "dataset_size_is_public": ("N is treated as public and written out (q = expected batch size / N); "
                                   + _RELATIONS[p.neighboring][1]),
        "sampling": sampling,
        "truncation": truncation,
        "mechanism": mechanism,
        "release": release,
        "history": [_mechanism(e) for e in ledger.events],
        "not_covered": list(not_covered),
    }


def privacy_statement(ledger: PrivacyLedger, not_covered: Sequence[str] = DEFAULT_NOT_COVERED,
                      release: str = "dp_sgd") -> str:
    """Human-readable privacy statement of a ledger (see privacy_report for JSON)."""
    r = privacy_report(ledger, not_covered, release)
    accountant = r["accountant"].upper() + (
        f" (value_discretization_interval={r['pld_discretization']:g}, pessimistic)"
        if r["pld_discretization"] is not None else "")
    batch = (f"{r['expected_batch_size']:.6g} of N={r['dataset_size']}"
             if r["dataset_size"] is not None else "q * N (N not recorded)")
    lines = [
        f"({r['epsilon']:.4g}, {r['delta']:g})-differential privacy"
        + (f", target epsilon {r['target_epsilon']:g}" if r["target_epsilon"] else ""),
        f"  unit of privacy: {r['neighboring_relation']}",
        f"  dataset size: {r['dataset_size_is_public']}",
        f"  mechanism: {r['steps']} {RELEASES[release][0]}; {r['mechanism']}",
        f"  noise_multiplier: {r['noise_multiplier']:g}; sampling_prob q: "
        f"{r['sampling_prob']:.6g}; expected batch size: {batch}",
        f"  sampling: {r['sampling']}; the seed must stay secret",
    ]
    t = r["truncation"]
    lines.append("  truncation: none (batches are never cut)" if t is None else
                 f"  truncation: batches capped at {t['max_batch_size']} examples "
                 f"(P(cut) per step {t['truncation_probability_per_step']:.3g}); "
                 f"accounted as {t['analysis']}")
    lines.append(f"  accountant: {accountant}")
    if len(r["history"]) > 1:
        lines.append("  composed mechanisms (in order):")
        lines += [f"    - {json.dumps(h, sort_keys=True)}" for h in r["history"]]
    lines.append("  NOT covered by this guarantee:")
    lines += [f"    - {item}" for item in r["not_covered"]]
    return "\n".join(lines)
