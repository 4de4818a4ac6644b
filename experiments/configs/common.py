"""Shared pieces of experiment configs: `:arg` parsing and the default config tree.

A config file's `get_config(arg)` starts from `base_config()` and fills in a table row. Variants are
chosen with `:arg` (big_vision style), e.g. `mnist.py:demo,method=full_dp,epsilon=1,seed=2`.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections
from ml_collections import config_dict

METHODS = ("dpwave", "full_dp", "bicubic")


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses 'a,b=1,c=x' into a ConfigDict over `defaults` (bare words set booleans or `variant`)."""
    out = ml_collections.ConfigDict(defaults)
    for part in filter(None, (arg or "").split(",")):
        key, eq, value = part.partition("=")
        if not eq:
            if key in defaults and isinstance(defaults[key], bool):
                out[key] = True
            else:
                out.variant = key
            continue
        if key not in defaults:
            raise ValueError(f"unknown config arg {key!r}; known: {sorted(defaults)}")
        kind = type(defaults[key])
        out[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
    return out


def epsilon_value(text: str) -> float:
    """'1' -> 1.0; 'inf' -> math.inf (the non-private reference); 'public' -> 0.0 (the public-only control)."""
    if text.lower() == "public":
        return 0.0
    return math.inf if text.lower() in ("inf", "infinity") else float(text)


def dataset(name: str, split: str, privacy: str, **kw: Any) -> dict:
    return dict(dict(name=name, split=split, privacy=privacy, data_dir="", manual_dir="",
                     override_private_default=False), **kw)


def base_config() -> ml_collections.ConfigDict:
    """Every field a run reads; configs override values, never add keys (the config is locked)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.method = "dpwave"  # dpwave | full_dp (all scales DP) | bicubic (coarse DP + bicubic upsampling)

    c.data = ml_collections.ConfigDict()
    c.data.image_size = 32
    c.data.channels = 1
    c.data.num_classes = 10  # 0 for captions
    c.data.condition = "label"  # label | caption | none
    # labels: keep only these classes (DatasetSpec.labels, e.g. the shift variant's public digits 0-4); None: all.
    c.data.public = dataset("mnist5k", "public", "public", labels=None)
    c.data.private = dataset("mnist5k", "private", "private", labels=None)
    c.data.heldout = dataset("mnist5k", "heldout", "public", labels=None)
    c.data.test = dataset("mnist5k", "test", "public", labels=None)

    c.wavelet = dict(name="haar", levels=2, mode="symmetric")

    c.tokenizer = ml_collections.ConfigDict(dict(
        model=dict(patch_sizes=(2, 2, 4), codebook_size=256, code_dim=8, width=64, depth=2),
        steps=600, batch_size=64, learning_rate=2e-3, init_from=""))

    c.transformer = ml_collections.ConfigDict(dict(
        width=128, depth=2, num_heads=4, mlp_dim=256, dropout=0.0, cond_dropout=0.1, max_text_len=0,
        dtype="float32"))

    c.pretrain = ml_collections.ConfigDict(dict(steps=600, batch_size=64, learning_rate=1e-3, init_from=""))

    c.dp = ml_collections.ConfigDict(dict(
        target_epsilon=10.0, delta=1e-5, noise_multiplier=config_dict.placeholder(float),
        l2_clip=1.0, expected_batch_size=128, steps=200, optimizer="adam", learning_rate=1e-3,
        weight_decay=0.0, microbatch_size=16, trainable="all", accountant="pld",
        compose_on_resume=False, allow_large_delta=False, log_private_metrics=False,
        # The finetuning recipe (dpwave/train/dp_recipe.py), every option off by default. target_epsilon=0 is the
        # public-only control: no DP stage, the pretrained model is sampled, no private data is read.
        # trainable: '+'-joined groups of dpwave.models.transformer.trainable_mask (all, attention, mlp, norm,
        # embed, cond, head, lora); few trained coordinates mean less noise (Yu et al. 2022; Li et al. 2022).
        # lora_rank > 0 adds LoRA adapters (B = 0 at init: the pretrained function is unchanged) to
        # lora_targets ('+'-joined q, k, v, o, mlp) for the DP stage only; train them with trainable='lora'.
        lora_rank=0, lora_targets="q+v",
        # Learning rate: warmup_steps of linear warmup from 0, then lr_schedule: constant | cosine | linear
        # (decay to 0 at dp.steps).
        lr_schedule="constant", warmup_steps=0,
        # EMA of the DP parameters (0 = off); the sample stage uses it. Post-processing: no privacy cost.
        ema_decay=0.0,
        # Condition dropout of the DP stage; None: transformer.cond_dropout (pretraining's).
        cond_dropout=config_dict.placeholder(float),
        # Tuning mode (docs/tuning.md): data.private is a PUBLIC split standing in for the private data (the
        # DP stage refuses private data then). tuning_private_size: the private N it simulates (same q and
        # noise per step sigma/B as that run); 0: the stand-in's own size.
        tuning=False, tuning_private_size=0,
        # Certified per-example norms of dense weights without per-example gradients (dpwave.privacy.ghost),
        # the default; False: materialized per-example gradients (vmap), the reference path. Timing and
        # memory of both: experiments/bench/bench_dp_step.py.
        use_ghost_norms=True,
        # Neighbouring relation: add_or_remove_one, or replace_one (N fixed on both sides; accountant pld only).
        neighboring="add_or_remove_one",
        # The secret seed of the Poisson draws, the noise and the DP step's per-example randomness. By default a
        # fresh one is drawn from the OS and kept owner-only in <workdir>/dp_finetune/secret_seed.json (single
        # host). secret_seed_file: an owner-only (chmod 600) file holding the seed, the same on every host; or
        # set the environment variable DPWAVE_DP_SECRET_SEED. secret_seed: reproducibility mode (tests), NOT
        # secret: it is written to config.json and the logs, and whoever knows it can undo the noise.
        secret_seed_file=config_dict.placeholder(str),
        secret_seed=config_dict.placeholder(int)))

    c.refiner = ml_collections.ConfigDict(dict(
        model=dict(widths=(64, 64), num_blocks=3, objective="flow", sample_steps=10, cond_noise=0.05),
        steps=600, batch_size=64, learning_rate=2e-3, init_from=""))

    c.sample = ml_collections.ConfigDict(dict(
        num_samples=1000, batch_size=250, temperature=1.0, top_k=0, top_p=1.0, guidance_scale=1.0,
        prompts="labels"))  # labels: balanced class labels; heldout: captions of the held-out split

    # The FD-cls feature classifier is trained with a fixed seed, so every run is scored by the same one.
    c.eval = ml_collections.ConfigDict(dict(feature_epochs=10, downstream_epochs=10, inception_weights="",
                                            num_real=1000))

    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=200, max_to_keep=2))
    c.log_every_steps = 50
    c.image_every_steps = 0
    return c
