"""The DP finetuning recipe's options (`config.dp`), each off by default, and the run modes around them.

* Parameter-efficient finetuning: `dp.recipe.trainable` (named groups, `transformer.trainable_mask`) and LoRA
  adapters added for the DP stage only (`dp.recipe.lora_rank`, `dp.recipe.lora_targets`; B zero-initialized, so the
  pretrained function is unchanged until they train). Pretraining never has adapters.
* `dp.recipe.lr_schedule` / `dp.recipe.warmup_steps`: linear warmup from 0, then constant, cosine or linear decay to 0.
* `dp.recipe.ema_decay`: an exponential moving average of the DP parameters, kept in the DP state (its
  checkpoints), updated inside the jitted step (`steps.dp_step`) and sampled from; post-processing of the noised
  iterates, so it costs no privacy.
* `dp.recipe.cond_dropout`: condition dropout of the DP stage (None: pretraining's `transformer.cond_dropout`).
* Modes (`settings.Mechanism`, the stages): `dp.mechanism.target_epsilon = 0` is the public-only control (no DP
  stage; the pretrained model is sampled; nothing trains on private data). `dp.mechanism.tuning` runs the DP stage on
  a PUBLIC split standing in for the private one (docs/tuning.md); with `dp.mechanism.tuning_private_size` its
  sampling rate and noise per step (q and sigma/B) are those of the private run it stands in for.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import optax

from dpwave.models import transformer as transformer_lib
from dpwave.train.settings import Recipe, Settings


def learning_rate(recipe: Recipe, steps: int) -> optax.ScalarOrSchedule:
    """`dp.recipe.learning_rate` with `dp.recipe.warmup_steps` of linear warmup from 0, then `dp.recipe.lr_schedule`
    over the remaining steps: constant, or cosine / linear decay to 0 at `steps` (dp.mechanism.steps). Warmup and
    decay are the standard schedule of DP finetuning recipes (e.g. Li et al. 2022; De et al. 2022 use warmup and
    decay)."""
    lr, warmup = recipe.learning_rate, recipe.warmup_steps
    if recipe.lr_schedule == "constant" and not warmup:
        return lr
    decay_steps = max(steps - warmup, 1)
    after = {"constant": optax.constant_schedule(lr),
             "cosine": optax.cosine_decay_schedule(lr, decay_steps),
             "linear": optax.linear_schedule(lr, 0.0, decay_steps)}[recipe.lr_schedule]
    if not warmup:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def inner_optimizer(recipe: Recipe, steps: int) -> optax.GradientTransformation:
    """The optimizer the DP chain feeds with the noised mean gradient (`DpSgdMechanism.optimizer`)."""
    lr = learning_rate(recipe, steps)
    if recipe.optimizer == "adamw":  # decay acts on the parameters: post-processing, no privacy cost
        return optax.adamw(lr, weight_decay=recipe.weight_decay)
    return {"sgd": optax.sgd, "adam": optax.adam}[recipe.optimizer](lr)


def load_pretrained(params: Any, pretrained: Any) -> Any:
    """`params` (the DP stage's model: the pretraining architecture plus optional LoRA adapters) with every
    leaf that `pretrained` holds at the same path taken from it; the adapters keep their initialization."""
    values = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(pretrained)}
    used = set()

    def take(path, leaf):
        key = jax.tree_util.keystr(path)
        if key not in values:
            if not transformer_lib.is_lora_leaf(path):
                raise ValueError(f"the DP model's parameter {key} is neither pretrained nor a LoRA adapter")
            return leaf
        if values[key].shape != leaf.shape:
            raise ValueError(f"pretrained {key} has shape {values[key].shape}, the DP model {leaf.shape}")
        used.add(key)
        return values[key]

    out = jax.tree_util.tree_map_with_path(take, params)
    if missing := sorted(values.keys() - used):
        raise ValueError(f"pretrained parameters {missing[:3]} have no place in the DP model")
    return out


def tuning_banner(settings: Settings, dataset_size: int) -> str:
    """The first lines of a tuning run's privacy statement."""
    mechanism, source_label = settings.dp.mechanism, settings.data.specs["private"].label
    simulated = mechanism.simulated_size(dataset_size)
    target = "inf" if math.isinf(mechanism.target_epsilon) else f"{mechanism.target_epsilon:g}"
    return (f"TUNING RUN (dp.mechanism.tuning): the DP stage read the PUBLIC split {source_label} ({dataset_size} "
            f"examples) in place of private data; no private data was read and no privacy claim is made.\n"
            f"  It simulates a private run of N = {simulated} at target epsilon {target} (same q, steps and "
            f"noise per step sigma/B); the accounting below is of the public stand-in.\n")
