"""The privacy guarantee of a ledger, as a JSON-ready report and a human-readable statement."""

from __future__ import annotations

import json
from collections.abc import Sequence

from dp_accounting import dp_event

from dpwave.privacy.accounting import truncation_probability
from dpwave.privacy.ledger import PrivacyLedger

DEFAULT_NOT_COVERED = (
    "data declared public: pretraining data and the data of every component trained "
    "without DP (e.g. tokenizers, refiners, evaluation feature networks)",
    "hyperparameter tuning, model selection and repeated runs on the private data "
    "(each extra run spends its own budget)",
    "labels, captions or prompts supplied at generation time: covered only if they "
    "come from public or held-out sources, never if taken from the private set",
    "the dataset size N and the DP hyperparameters, which are treated as public",
    "secrecy of the sampling seed and of the noise key: whoever knows them can undo "
    "the sampling amplification and the noise",
    "side channels (timing, memory, floating-point effects)",
)


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


def privacy_report(ledger: PrivacyLedger,
                   not_covered: Sequence[str] = DEFAULT_NOT_COVERED) -> dict:
    """The privacy guarantee of a ledger as a JSON-ready dict."""
    p = ledger.params
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
        "expected_batch_size": p.expected_batch_size,
        "accountant": p.accountant,
        "pld_discretization": p.pld_discretization if p.accountant == "pld" else None,
        "neighboring_relation": "add or remove one example of the private training set",
        "sampling": ("Poisson: each example joins each step independently with "
                     "probability sampling_prob; the draws are a deterministic function "
                     "of (seed, step)"),
        "truncation": truncation,
        "mechanism": ("Gaussian noise of std noise_multiplier * C added once per step to "
                      "the sum of per-example gradients clipped to L2 norm C"),
        "history": [_mechanism(e) for e in ledger.events],
        "not_covered": list(not_covered),
    }


def privacy_statement(ledger: PrivacyLedger,
                      not_covered: Sequence[str] = DEFAULT_NOT_COVERED) -> str:
    """Human-readable privacy statement of a ledger (see privacy_report for JSON)."""
    r = privacy_report(ledger, not_covered)
    accountant = r["accountant"].upper() + (
        f" (value_discretization_interval={r['pld_discretization']:g}, pessimistic)"
        if r["pld_discretization"] is not None else "")
    batch = (f"{r['expected_batch_size']:.6g} of N={r['dataset_size']}"
             if r["dataset_size"] is not None else "q * N (N not recorded)")
    lines = [
        f"({r['epsilon']:.4g}, {r['delta']:g})-differential privacy"
        + (f", target epsilon {r['target_epsilon']:g}" if r["target_epsilon"] else ""),
        f"  unit of privacy: {r['neighboring_relation']}",
        f"  mechanism: {r['steps']} DP-SGD steps; {r['mechanism']}",
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
