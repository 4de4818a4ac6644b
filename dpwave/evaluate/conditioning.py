"""Conditioning accuracy: how often a generated sample shows the class it was prompted with.

A classifier trained on held-out real images (the FD-cls feature network) labels each sample; the score is
the top-1 agreement of that label with the sample's prompt, overall and per prompted class. Chance is
1/num_classes; real images score about the classifier's own accuracy on real test images (its ceiling).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from dpwave.evaluate.images import check_labels


class Conditioning(NamedTuple):
    accuracy: float                 # over all samples
    per_class: list[float | None]   # per prompted class; None for a class no sample was prompted with
    counts: list[int]               # samples prompted with each class


def conditioning_accuracy(predicted: np.ndarray, prompts: np.ndarray, *, num_classes: int) -> Conditioning:
    """Agreement of the classifier's labels `predicted` with the samples' `prompts` (both (N,) ints)."""
    prompts = check_labels(prompts, len(prompts), name="prompts")
    predicted = check_labels(predicted, len(prompts), name="predicted labels")
    if prompts.max() >= num_classes:
        raise ValueError(f"prompts reach class {prompts.max()} but the classifier knows {num_classes} classes")
    hits = predicted == prompts
    counts = np.bincount(prompts, minlength=num_classes)
    correct = np.bincount(prompts, weights=hits, minlength=num_classes)
    per_class = [float(c / n) if n else None for c, n in zip(correct, counts)]
    return Conditioning(float(hits.mean()), per_class, [int(n) for n in counts])
