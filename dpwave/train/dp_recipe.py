"""The DP finetuning recipe's options (`config.dp`), each off by default, and the run modes around them.

* Parameter-efficient finetuning: `dp.trainable` (named groups, `transformer.trainable_mask`) and LoRA
  adapters added for the DP stage only (`dp.lora_rank`, `dp.lora_targets`; B zero-initialized, so the
  pretrained function is unchanged until they train). Pretraining never has adapters.
* `dp.lr_schedule` / `dp.warmup_steps`: linear warmup from 0, then constant, cosine or linear decay to 0.
* `dp.ema_decay`: an exponential moving average of the DP parameters, kept in the DP state (its
  checkpoints) and sampled from; post-processing of the noised iterates, so it costs no privacy.
* `dp.cond_dropout`: condition dropout of the DP stage (None: pretraining's `transformer.cond_dropout`).
* Modes: `dp.target_epsilon = 0` is the public-only control (no DP stage; the pretrained model is
  sampled; no private data is read). `dp.tuning` runs the DP stage on a PUBLIC split standing in for the
  private one (docs/tuning.md); with `dp.tuning_private_size` its sampling rate and noise per step (q and
  sigma/B) are those of the private run it stands in for.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import ml_collections
import optax

from dpwave.models import transformer as transformer_lib

SCHEDULES = ("constant", "cosine", "linear")
OPTIMIZERS = ("sgd", "adam", "adamw")


def public_only(config: ml_collections.ConfigDict) -> bool:
    """The public-only control: target epsilon 0, no DP stage, no private data read."""
    return config.dp.target_epsilon == 0


def check(config: ml_collections.ConfigDict) -> None:
    """Refuses inconsistent DP recipe options before any stage runs."""
    dp = config.dp
    if not dp.target_epsilon >= 0:
        raise ValueError(f"dp.target_epsilon={dp.target_epsilon}: use > 0, inf (non-private reference) or 0 "
                         "(public-only control)")
    if public_only(config) and dp.tuning:
        raise ValueError("dp.tuning needs a DP stage; dp.target_epsilon=0 (the public-only control) has none")
    if dp.tuning_private_size and not dp.tuning:
        raise ValueError(f"dp.tuning_private_size={dp.tuning_private_size} applies only with dp.tuning=True")
    if dp.tuning_private_size < 0:
        raise ValueError(f"dp.tuning_private_size={dp.tuning_private_size} must be >= 0 (0: the proxy's own size)")
    if dp.optimizer not in OPTIMIZERS:
        raise ValueError(f"dp.optimizer={dp.optimizer!r}; use one of {OPTIMIZERS}")
    if dp.weight_decay and dp.optimizer != "adamw":
        raise ValueError(f"dp.weight_decay={dp.weight_decay} applies only to dp.optimizer='adamw' (got "
                         f"{dp.optimizer!r}); set it to 0 or use adamw")
    if dp.lr_schedule not in SCHEDULES:
        raise ValueError(f"dp.lr_schedule={dp.lr_schedule!r}; use one of {SCHEDULES}")
    if not 0 <= dp.warmup_steps <= dp.steps:
        raise ValueError(f"dp.warmup_steps={dp.warmup_steps} must be in [0, dp.steps={dp.steps}]")
    if not 0 <= dp.ema_decay < 1:
        raise ValueError(f"dp.ema_decay={dp.ema_decay} must be in [0, 1) (0: no EMA)")
    groups = transformer_lib.trainable_groups(dp.trainable)
    if dp.lora_rank and not {"lora", "all"} & set(groups):
        raise ValueError(f"dp.lora_rank={dp.lora_rank} adds adapters that dp.trainable={dp.trainable!r} keeps "
                         "frozen at zero; add 'lora' to dp.trainable (e.g. 'cond+lora') or set dp.lora_rank=0")


def learning_rate(dp: ml_collections.ConfigDict) -> optax.ScalarOrSchedule:
    """`dp.learning_rate` with `dp.warmup_steps` of linear warmup from 0, then `dp.lr_schedule` over the
    remaining steps: constant, or cosine / linear decay to 0 at `dp.steps`. Warmup and decay are the
    standard schedule of DP finetuning recipes (e.g. Li et al. 2022; De et al. 2022 use warmup + decay)."""
    lr, warmup, total = dp.learning_rate, dp.warmup_steps, dp.steps
    if dp.lr_schedule == "constant" and not warmup:
        return lr
    decay_steps = max(total - warmup, 1)
    after = {"constant": optax.constant_schedule(lr),
             "cosine": optax.cosine_decay_schedule(lr, decay_steps),
             "linear": optax.linear_schedule(lr, 0.0, decay_steps)}[dp.lr_schedule]
    if not warmup:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def inner_optimizer(dp: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The optimizer the DP chain feeds with the noised mean gradient (`DpSgdMechanism.optimizer`)."""
    lr = learning_rate(dp)
    if dp.optimizer == "adamw":  # decay acts on the parameters: post-processing, no privacy cost
        return optax.adamw(lr, weight_decay=dp.weight_decay)
    return {"sgd": optax.sgd, "adam": optax.adam}[dp.optimizer](lr)


def with_ema(step_fn: Callable, decay: float) -> Callable:
    """`step_fn(state, ...)` followed by `state.extra <- decay * state.extra + (1 - decay) * state.params`
    in the same jitted call (unchanged when decay is 0). `state.extra` starts as the pretrained params."""
    if not decay:
        return step_fn

    @jax.jit
    def step(state, *args):
        state, metrics = step_fn(state, *args)
        ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state.extra, state.params)
        return dataclasses.replace(state, extra=ema), metrics

    return step


def load_pretrained(params: Any, pretrained: Any) -> Any:
    """`params` (the DP stage's model: the pretraining architecture plus optional LoRA adapters) with every
    leaf that `pretrained` holds at the same path taken from it; the adapters keep their initialization."""
    values = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(pretrained)}
    used = set()

    def take(path, leaf):
        key = jax.tree_util.keystr(path)
        if key not in values:
            if not any(n in transformer_lib.LORA_LEAF_NAMES for n in transformer_lib._path_names(path)):
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


def simulated_private_size(config: ml_collections.ConfigDict, dataset_size: int) -> int:
    """The N that sets q = expected batch / N: the private run's size that a tuning run stands in for
    (`dp.tuning_private_size`), else the DP input's own size."""
    return config.dp.tuning_private_size if config.dp.tuning and config.dp.tuning_private_size else dataset_size


def noise_scale(config: ml_collections.ConfigDict, dataset_size: int) -> float:
    """Factor applied to the private run's sigma in a tuning run, n / N_private: with the sampling rate q
    of the private run, the expected batch is q n instead of q N_private, and sigma * n / N_private over it
    keeps the noise per step sigma/B of the private run (Sander et al. 2023 simulate runs the same way)."""
    return dataset_size / simulated_private_size(config, dataset_size)


def tuning_banner(config: ml_collections.ConfigDict, source_label: str, dataset_size: int) -> str:
    """The first lines of a tuning run's privacy statement."""
    dp = config.dp
    simulated = simulated_private_size(config, dataset_size)
    target = "inf" if math.isinf(dp.target_epsilon) else f"{dp.target_epsilon:g}"
    return (f"TUNING RUN (dp.tuning): the DP stage read the PUBLIC split {source_label} ({dataset_size} examples) in "
            f"place of private data; no private data was read and no privacy claim is made.\n"
            f"  It simulates a private run of N = {simulated} at target epsilon {target} (same q, steps and "
            f"noise per step sigma/B); the accounting below is of the public stand-in.\n")
