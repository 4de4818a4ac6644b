"""Named DP finetuning recipes: config overrides that the `recipe=NAME` config arg selects.

`DEFAULT` is the recipe every config a user starts from applies (mnist.py's variants, folder.py, the paper
configs). `mnist.py:shift,recipe=NAME` applies another; `python -m experiments.reproduce --table mnist_tune`
scores them on public data only (docs/tuning.md), so choosing among them spends no private epsilon.
Sources: parameter-efficient DP finetuning (Yu et al. 2022, "Differentially Private Fine-tuning of Language Models";
Li et al. 2022, "Large Language Models Can Be Strong Differentially Private Learners"): train few coordinates so
the noise, whose norm grows with sqrt(#coordinates), stays below the clipped signal; large batches with the noise
multiplier recalibrated (De et al. 2022; Sander et al. 2023, TAN); an EMA of the DP iterates
(De et al. 2022), free as post-processing.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

from dpwave import privacy


@dataclasses.dataclass(frozen=True)
class NoiseReference:
    """The DP setting a learning rate was tuned at: its noise per example sigma / B sets the rule's scale."""

    epsilon: float
    delta: float
    dataset_size: int
    expected_batch_size: int
    steps: int

    def noise_per_example(self, accountant: str) -> float:
        return _noise_per_example(self.epsilon, self.delta, self.expected_batch_size / self.dataset_size, self.steps,
                                  accountant) / self.expected_batch_size


@functools.cache
def _noise_per_example(epsilon: float, delta: float, q: float, steps: int, accountant: str) -> float:
    return privacy.calibrate_noise(epsilon, delta, q, steps, accountant=accountant)


def noise_scaled_lr(base: float, reference: NoiseReference) -> Callable[[Any, int], float]:
    """A DP-SGD learning rate for any run: `base * min(1, (r / (sigma / B))^2)`, where sigma / B is the run's noise
    per example (sigma calibrated to its target epsilon, q = B / N and steps) and r that of `reference`; `base`
    without noise.

    With noise-dominated updates, the noise's damage to the model grows as (lr sigma / B)^2 per coordinate
    while the useful drift grows as lr, so the best learning rate falls as (B / sigma)^2; the rule keeps
    lower epsilons and smaller batches from drowning the pretrained model (chosen on the public stand-in,
    docs/tuning.md). It reads public quantities only (N, B, steps, the target epsilon and delta).
    """

    def learning_rate(config: Any, dataset_size: int) -> float:
        m = config.dp.mechanism
        if m.target_epsilon == 0 or not math.isfinite(m.target_epsilon):
            return base
        noise = _noise_per_example(m.target_epsilon, m.delta, m.expected_batch_size / dataset_size, m.steps,
                                   m.accountant) / m.expected_batch_size
        return base * min(1.0, (reference.noise_per_example(m.accountant) / noise) ** 2)

    return learning_rate


# Where the search tuned the DP-SGD learning rate (docs/tuning.md): epsilon 10 on the shift table's 2,000
# private digits, expected batch 1,024, 150 steps (sigma / B = 0.0032).
TUNED_AT = NoiseReference(epsilon=10.0, delta=1e-5, dataset_size=2000, expected_batch_size=1024, steps=150)

# The search's DP-SGD candidates: every parameter, expected batch 1,024, no condition dropout.
_SGD_B1024 = dict(trainable="all", optimizer="sgd", expected_batch_size=1024, cond_dropout=0.0)

DEFAULT = "sgd_drop_temp"

# Each recipe: overrides of config.dp.recipe or config.dp.mechanism (plain keys: a recipe may set the expected
# batch size) or of any config path (dotted keys, e.g. sampling); a callable value is evaluated on the config and
# the private set's size.
RECIPES: dict[str, dict[str, Any]] = {
    # The tuned recipe (docs/tuning.md): every parameter, plain DP-SGD (Adam's per-coordinate scaling turns
    # noise-dominated coordinates into full-size random steps), sampling rate q = 0.512 (expected batch 1,024
    # of 2,000: sigma/B 4x lower than batch 256 at the same steps), no condition dropout, learning rate 0.3
    # at the noise per example of TUNED_AT or less, scaled by (B / sigma)^2 above it.
    "sgd": dict(trainable="all", optimizer="sgd", expected_batch_size=lambda config, n: round(0.512 * n),
                learning_rate=noise_scaled_lr(0.3, TUNED_AT), cond_dropout=0.0),
    # The landed recipe: every parameter, Adam 5e-4, condition dropout 0.1 (pretraining's).
    "all": dict(trainable="all", learning_rate=5e-4),
    "all_nodrop": dict(trainable="all", learning_rate=5e-4, cond_dropout=0.0),
    # Only the class table (11 x width): the new classes get their own condition vectors.
    "cond": dict(trainable="cond", learning_rate=2e-2, cond_dropout=0.0),
    # Class table + LoRA adapters on every attention projection and the MLP.
    "cond_lora": dict(trainable="cond+lora", lora_rank=8, lora_targets="q+k+v+o+mlp", learning_rate=3e-3,
                      cond_dropout=0.0),
    "cond_lora_ema": dict(trainable="cond+lora", lora_rank=8, lora_targets="q+k+v+o+mlp", learning_rate=3e-3,
                          cond_dropout=0.0, ema_decay=0.95),
    "cond_norm_head": dict(trainable="cond+norm+head", learning_rate=3e-3, cond_dropout=0.0),
    # Batch scaling at the same number of steps (4x the examples; sigma recalibrated to the target).
    "all_b1024": dict(trainable="all", learning_rate=5e-4, expected_batch_size=1024),
    "all_sgd_b1024": {**_SGD_B1024, "learning_rate": 0.3},
    "all_sgd_b1024_lr1": {**_SGD_B1024, "learning_rate": 1.0},
    "all_sgd_b1024_lr01": {**_SGD_B1024, "learning_rate": 0.1},
    "all_sgd_b256": dict(trainable="all", optimizer="sgd", learning_rate=0.3, cond_dropout=0.0),
    "all_sgd_b1024_lr003": {**_SGD_B1024, "learning_rate": 0.03},
    "cond_lora4_sgd_b1024": {**_SGD_B1024, "trainable": "cond+lora", "lora_rank": 4, "lora_targets": "q+k+v+o+mlp",
                             "learning_rate": 0.3},
    "cond_sgd_b1024": {**_SGD_B1024, "trainable": "cond", "learning_rate": 1.0},
    "all_sgd_b1024_lr001": {**_SGD_B1024, "learning_rate": 0.01},
    "all_sgd_b1024_lr0003": {**_SGD_B1024, "learning_rate": 0.003},
    "all_sgd_b1024_ema": {**_SGD_B1024, "learning_rate": 0.3, "ema_decay": 0.98},
    "lora16_b1024": dict(trainable="cond+lora", lora_rank=16, lora_targets="q+k+v+o+mlp", learning_rate=3e-3,
                         cond_dropout=0.0, expected_batch_size=1024),
    "lora16_b1024_lr1e2": dict(trainable="cond+lora", lora_rank=16, lora_targets="q+k+v+o+mlp", learning_rate=1e-2,
                               cond_dropout=0.0, expected_batch_size=1024),
}

# Ablations of the default (docs/tuning.md, `--table mnist_ablate`): condition dropout kept during DP finetuning
# (an unconditional model for guidance); only the attention or the MLP layers trained, with the class table.
RECIPES["sgd_drop"] = {**RECIPES["sgd"], "cond_dropout": 0.1}
RECIPES["sgd_attn"] = {**RECIPES["sgd"], "trainable": "cond+attention"}
RECIPES["sgd_mlp"] = {**RECIPES["sgd"], "trainable": "cond+mlp"}
# The search for dp_diffusion's pixel U-Net (docs/tuning.md): sgd_drop (the default less its AR sampling
# temperature, which the pixel model does not read) at 1/3, 3x and 10x the learning rate, with the same noise scaling.
RECIPES["sgd_drop_lr01"] = {**RECIPES["sgd_drop"], "learning_rate": noise_scaled_lr(0.1, TUNED_AT)}
RECIPES["sgd_drop_lr1"] = {**RECIPES["sgd_drop"], "learning_rate": noise_scaled_lr(1.0, TUNED_AT)}
RECIPES["sgd_drop_lr3"] = {**RECIPES["sgd_drop"], "learning_rate": noise_scaled_lr(3.0, TUNED_AT)}


def epsilon_temperature(config: Any, dataset_size: int) -> float:
    """Sampling temperature 0.8 for a DP stage at target epsilon >= 10 (inf included), 1.0 below and for the
    public-only control: on the stand-in (docs/tuning.md, 3 seeds) 0.8 improved every measure but recall of the
    sgd_drop models at epsilon 10, cost FD-cls and downstream accuracy at epsilon 1 and of the public-only model.
    Reads the target epsilon only (public); post-processing, no privacy cost."""
    del dataset_size
    return 0.8 if config.dp.mechanism.target_epsilon >= 10 else 1.0


# The winner of the ablations (docs/tuning.md, "Ablations of the default"): sgd_drop sampled at
# `epsilon_temperature`.
RECIPES["sgd_drop_temp"] = {**RECIPES["sgd_drop"], "sample.temperature": epsilon_temperature}


def apply(config: Any, name: str, dataset_size: int, **keep: Any) -> None:
    """Applies recipe `name` to the config of a run whose private set has `dataset_size` examples; an
    unknown name lists the known ones. `keep` replaces recipe entries (e.g. `expected_batch_size=` of a
    planner or a test-sized run), before the recipe's rules (e.g. its learning rate) read them."""
    if name not in RECIPES:
        raise ValueError(f"unknown DP recipe {name!r}; known recipes: {sorted(RECIPES)}")
    entries = {**RECIPES[name], **keep}
    # Plain values first: a callable (e.g. a noise-scaled learning rate) reads the batch size and steps.
    for key, value in sorted(entries.items(), key=lambda item: callable(item[1])):
        if callable(value):
            value = value(config, dataset_size)
        *path, leaf = (key if "." in key else f"dp.{_dp_section(config, name, key)}.{key}").split(".")
        node = config
        for part in path:
            node = node[part]
        node[leaf] = value


def _dp_section(config: Any, recipe: str, key: str) -> str:
    """The section of config.dp that recipe entry `key` sets: recipe, or mechanism (the expected batch size)."""
    section = next((s for s in ("recipe", "mechanism") if key in config.dp[s]), None)
    if section is None:
        raise ValueError(f"DP recipe {recipe!r} sets {key!r}, a key of neither config.dp.recipe nor "
                         "config.dp.mechanism")
    return section
