"""Shared pieces of experiment configs: `:arg` parsing and the default config tree.

A config file's `get_config(arg)` starts from `base_config()` and fills in a table row. Variants are
chosen with `:arg` (big_vision style), e.g. `mnist.py:demo,method=full_dp,epsilon=1,seed=2`.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections
from ml_collections.config_dict import placeholder

from dpwave.train.settings import METHODS  # noqa: F401 (the tables' methods)


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


def dataset(name: str | None, split: str | None, privacy: str, **kw: Any) -> dict:
    """A `config.data.<role>` section (dpwave.data.DatasetSpec); None name/split are placeholders a config fills."""
    spec = dict(name=name or placeholder(str), split=split or placeholder(str), privacy=privacy,
                data_dir=placeholder(str), manual_dir=placeholder(str), override_private_default=False, labels=None)
    return {**spec, **kw}


def base_config() -> ml_collections.ConfigDict:
    """Every field a run reads, with the framework's defaults; configs override values, never add keys (the config
    is locked). A placeholder (None) is either optional or a dataset choice a config must make."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # the public stages' randomness (the DP stage draws from its own secret seed)
    # dpwave | full_dp (all scales under DP, the baseline) | bicubic (coarse DP + bicubic) | dp_merf (DP-MERF,
    # Harder et al. 2021: one DP release of a random-feature mean embedding, a generator fitted to it) |
    # dpwave_merf (the same release of the coarse band, then the public refiner) | dp_diffusion (a pixel-space
    # flow model pretrained on public data and DP-SGD finetuned: the PDP-Diffusion / DP-LDM family)
    c.method = "dpwave"

    c.data = ml_collections.ConfigDict()
    c.data.image_size = placeholder(int)  # square side every role is read at (the dataset's choice)
    c.data.channels = placeholder(int)  # 1 or 3
    c.data.num_classes = placeholder(int)  # classes of label conditioning; None for captions or none
    c.data.condition = "label"  # label | caption | none
    # The four roles (dpwave.data.DatasetSpec); only the DP stage reads `private`. labels: keep only these
    # classes (e.g. a public split without the private data's new classes); None: all.
    c.data.public = dataset(None, None, "public")
    c.data.private = dataset(None, None, "private")
    c.data.heldout = dataset(None, None, "public")  # memorization reference; its captions prompt the sampler
    c.data.test = dataset(None, None, "public")  # reference of the sample metrics and downstream accuracy
    # The run-start content check refuses a public, heldout or test image identical to a private one, or a near
    # copy of one: similarity >= this (dpwave/data/near_duplicates.py; in [0.9, 1], lower refuses more).
    c.data.near_copy_threshold = 0.998

    c.wavelet = dict(name="haar", levels=2, mode="symmetric")  # the coarse band is image_size / 2**levels

    # Each public stage: its model, and steps / batch / learning rate. init_params_from: a finished stage
    # directory of the same stage, or a workdir holding one, whose parameters (only) the stage starts from.
    c.tokenizer = ml_collections.ConfigDict(dict(
        model=dict(patch_sizes=(2, 2, 4), codebook_size=256, code_dim=8, width=64, depth=2),
        steps=600, batch_size=64, learning_rate=2e-3, init_params_from=placeholder(str)))

    c.transformer = ml_collections.ConfigDict(dict(  # the AR model, pretrained and then DP-finetuned
        width=128, depth=2, num_heads=4, mlp_dim=256,  # CPU-sized; the paper configs scale it to ~0.3B
        dropout=0.0,  # off: the DP noise already regularizes, and dropout adds per-example randomness
        cond_dropout=0.1,  # drops the condition, so classifier-free guidance has an unconditional model
        max_text_len=0,  # caption bytes the model reads (caption conditioning only)
        dtype="float32",  # activations; it changes the numbers, so it is a model choice, not in perf
        # the blocks as one scan over stacked weights: one block compiled, not `depth` (another parameter layout)
        scan_blocks=False))

    c.pretrain = ml_collections.ConfigDict(dict(steps=600, batch_size=64, learning_rate=1e-3,
                                                init_params_from=placeholder(str)))

    # The DP stage in four sections, read by dpwave/train/settings.py into the types of the same names.
    c.dp = ml_collections.ConfigDict()
    # The mechanism (settings.Mechanism): what the guarantee depends on. target_epsilon: > 0 calibrates
    # noise_multiplier (None) to it over `steps`; inf: the non-private reference (no noise, still clipped); 0: the
    # public-only control (no DP stage, nothing trains on private data).
    c.dp.mechanism = ml_collections.ConfigDict(dict(
        target_epsilon=10.0, delta=1e-5, noise_multiplier=placeholder(float),
        l2_clip=1.0,  # C: the clipped sum moves by at most C when one example is added or removed
        expected_batch_size=128, steps=200,  # q = expected_batch_size / N; sigma is calibrated over `steps`
        accountant="pld",  # pld (tight, pessimistic discretization) | rdp (faster, looser)
        # Neighbouring relation: add_or_remove_one, or replace_one (N fixed on both sides; accountant pld only).
        neighboring="add_or_remove_one",
        allow_large_delta=False,  # refuse delta >= 1/N unless set
        # Tuning mode (docs/tuning.md): data.private is a PUBLIC split standing in for the private data (the
        # DP stage refuses private data then). tuning_private_size: the private N it simulates (same q and
        # noise per step sigma/B as that run); 0: the stand-in's own size.
        tuning=False, tuning_private_size=0))
    # The recipe (settings.Recipe, dpwave/train/dp_recipe.py), how the DP stage optimizes: no privacy cost.
    c.dp.recipe = ml_collections.ConfigDict(dict(
        optimizer="adam", learning_rate=1e-3, weight_decay=0.0,  # sgd | adam | adamw (weight_decay: adamw only)
        # trainable: '+'-joined groups of dpwave.models.transformer.trainable_mask (all, attention, mlp, norm,
        # embed, cond, head, lora); few trained coordinates mean less noise (Yu et al. 2022; Li et al. 2022).
        trainable="all",
        # lora_rank > 0 adds LoRA adapters (B = 0 at init: the pretrained function is unchanged) to
        # lora_targets ('+'-joined q, k, v, o, mlp) for the DP stage only; train them with trainable='lora'.
        lora_rank=0, lora_targets="q+v",
        # Learning rate: warmup_steps of linear warmup from 0, then lr_schedule: constant | cosine | linear
        # (decay to 0 at dp.mechanism.steps).
        lr_schedule="constant", warmup_steps=0,
        ema_decay=0.0,  # EMA of the DP parameters (0 = off); the sample stage uses it. Post-processing: free.
        cond_dropout=placeholder(float)))  # condition dropout of the DP stage; None: transformer.cond_dropout
    # The secret (settings.Secret) of the Poisson draws, the noise and the DP step's per-example randomness. By
    # default 256 bits are drawn from the OS and kept owner-only in <workdir>/dp_finetune/secret_seed.json (single
    # host). seed_file: an owner-only (chmod 600) file holding 32 to 64 hex digits (128 to 256 bits), the same on
    # every host; or set the environment variable DPWAVE_DP_SECRET_SEED (same format). Write one with
    # python -c 'import secrets; print(secrets.token_hex(32))'. seed: reproducibility mode (tests), NOT secret: it
    # is written to config.json and the logs, and whoever knows it can undo the noise.
    c.dp.secret = ml_collections.ConfigDict(dict(seed_file=placeholder(str), seed=placeholder(int)))
    # Operations (settings.DpOperations): how a DP run is resumed and logged; no stage input.
    c.dp.operations = ml_collections.ConfigDict(dict(
        compose_on_resume=False,  # a resume under changed mechanism settings composes them instead of refusing
        log_private_metrics=False))  # DP-stage loss etc. are computed from private data WITHOUT noise: off

    # The DP-MERF methods (dpwave/privacy/mean_embedding.py): one release of the class-conditional mean of
    # num_features random Fourier features (Gaussian kernel of length_scale; None: the median pairwise distance of
    # the public images) under config.dp.mechanism's epsilon, delta and accountant (its steps and
    # expected_batch_size unused), count_weight of the unit sensitivity on the class counts; then a generator
    # (code_dim, hidden) fitted to it by Adam for `steps` of `batch_size` generated images. Where this differs from
    # the authors' MNIST script (1,000 features, hidden 200-100, batch 500, 5 epochs): docs/baselines.md.
    c.merf = ml_collections.ConfigDict(dict(
        num_features=10_000, count_weight=0.5, length_scale=placeholder(float), code_dim=5, hidden=(200, 500),
        steps=1500, batch_size=200, learning_rate=1e-2))

    # dp_diffusion (dpwave/models/pixel_flow.py): a pixel-space flow-matching U-Net pretrained on the public split
    # (steps, batch_size, learning_rate) and DP-SGD finetuned on the private one under config.dp (mechanism and
    # recipe; dp.recipe.trainable must be 'all'); sample_steps Euler steps at sampling, guided by
    # sample.guidance_scale; cond_dropout trains the null class guidance needs (the DP stage: dp.recipe.cond_dropout
    # when set).
    c.diffusion = ml_collections.ConfigDict(dict(
        model=dict(width=32, num_blocks=3, sample_steps=20, cond_dropout=0.1),
        steps=800, batch_size=64, learning_rate=2e-3, init_params_from=placeholder(str)))

    # How the DP step computes the clipped sum, not what: every path gives the same update up to float rounding
    # (tests/privacy/test_clipping.py, test_ghost.py; tests/train/test_parallel.py), so none is a stage input.
    # microbatch_size: examples whose per-example gradients are live at once per device (None: the whole batch);
    # use_ghost_norms: certified norms of dense and conv kernels and embedding tables without per-example gradients
    # (dpwave.privacy.ghost); False: materialized per-example gradients (vmap). Time and memory of both:
    # experiments/bench/bench_dp_step.py.
    # input_workers threads make the training stages' batches (decode, resize, gather) up to input_prefetch steps
    # ahead (0 workers: in the loop's thread); each batch is a function of (seed, step) whatever these are.
    # Throughput and input-wait fractions: experiments/bench/bench_input.py.
    c.perf = ml_collections.ConfigDict(dict(microbatch_size=placeholder(int), use_ghost_norms=True,
                                            input_workers=2, input_prefetch=4))

    c.refiner = ml_collections.ConfigDict(dict(  # the fine bands given the coarse one (dpwave only)
        model=dict(widths=(64, 64), num_blocks=3, objective="flow", sample_steps=10, cond_noise=0.05),
        steps=600, batch_size=64, learning_rate=2e-3, init_params_from=placeholder(str)))

    c.sample = ml_collections.ConfigDict(dict(
        num_samples=1000, batch_size=250,  # the samples every metric is computed on
        # Classifier-free guidance cond + s (cond - uncond) with s = guidance_scale (0: the conditional model alone;
        # larger pushes towards the condition); it needs condition dropout in training.
        temperature=1.0, guidance_scale=1.0,
        top_k=placeholder(int), top_p=placeholder(float),  # None: no top-k / nucleus filtering
        prompts="labels"))  # labels: balanced class labels; heldout: captions of the held-out split

    # The FD-cls feature classifier is trained with a fixed seed, so every run is scored by the same one.
    # inception_weights: the FID weights (.npz); None: FID is reported as n/a and FD-cls stands in.
    c.eval = ml_collections.ConfigDict(dict(feature_epochs=10, downstream_epochs=10,
                                            inception_weights=placeholder(str), num_real=1000))

    c.checkpoint = ml_collections.ConfigDict(dict(every_steps=200, max_to_keep=2))  # resume is exact either way
    c.log_every_steps = 50  # metrics lines (and the DP stage's epsilon) every this many steps
    return c
