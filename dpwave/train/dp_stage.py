"""The only stage that reads private data: DP finetuning of the AR model.

Private images are mapped example by example to tokens with the frozen public tokenizer; batches are
drawn by the Poisson sampler the accountant assumes (pure function of (seed, step)); each step sums
clipped per-example gradients across devices and the DP optimizer adds the noise once, normalized by
the expected batch size. The privacy ledger and the sampler state live in every checkpoint; a rerun
restores them, refuses changed DP hyperparameters (unless `dp.compose_on_resume`), and the budget
guard refuses any step that would push epsilon past the target.
"""

from __future__ import annotations

import json
import math
import os
import secrets

import jax
import ml_collections
import optax
from absl import logging
from jax.sharding import Mesh

from dpwave import data, privacy
from dpwave.models import transformer as transformer_lib
from dpwave.train import builders, distributed, dp_recipe, loop, steps
from dpwave.train.public_stages import (encode_examples, init_pretrain, init_transformer, load_tokenizer,
                                        local_slice, restore_params, stage_key)


def calibrated_noise(config: ml_collections.ConfigDict, dataset_size: int) -> float:
    """sigma: given by config, 0 for the non-private reference (target epsilon inf), else calibrated so
    that `dp.steps` steps give epsilon <= target."""
    dp = config.dp
    if dp.noise_multiplier is not None:
        return float(dp.noise_multiplier)
    if math.isinf(dp.target_epsilon):
        return 0.0
    return privacy.calibrate_noise(dp.target_epsilon, dp.delta, dp.expected_batch_size / dataset_size, dp.steps,
                                   accountant=dp.accountant)


def dp_params(config: ml_collections.ConfigDict, dataset_size: int, sampler: data.PoissonSampler) -> privacy.DpParams:
    dp = config.dp
    return privacy.DpParams(
        # A tuning run keeps the noise per step sigma/B of the private run it simulates (dp_recipe.noise_scale).
        noise_multiplier=calibrated_noise(config, dp_recipe.simulated_private_size(config, dataset_size))
        * dp_recipe.noise_scale(config, dataset_size), sampling_prob=sampler.sampling_prob,
        delta=dp.delta, accountant=dp.accountant,
        target_epsilon=None if math.isinf(dp.target_epsilon) or dp.tuning else dp.target_epsilon,
        dataset_size=dataset_size, max_batch_size=sampler.truncated_max_batch_size,
        allow_large_delta=dp.allow_large_delta)


def dp_optimizer(config: ml_collections.ConfigDict, noise_multiplier: float, expected_batch_size: float,
                 seed: int) -> optax.GradientTransformation:
    dp = config.dp
    return privacy.dp_optimizer(ml_collections.ConfigDict(dict(
        name=dp.optimizer, learning_rate=dp_recipe.learning_rate(dp), l2_clip=dp.l2_clip,
        noise_multiplier=noise_multiplier,
        expected_batch_size=expected_batch_size, seed=seed, weight_decay=dp.weight_decay)))


def init_dp_state(params, trainable, optimizer: optax.GradientTransformation, ema: bool = False) -> steps.TrainState:
    """The DP stage's state; with `ema`, `extra` holds the EMA of the parameters (starting at `params`)."""
    return steps.TrainState(params, optimizer.init(privacy.partition(params, trainable)[0]), params if ema else None)


def final_transformer_params(config: ml_collections.ConfigDict, dp_dir: str):
    """The DP-finetuned AR parameters (their EMA when `dp.ema_decay` > 0), restored against a template of the
    DP stage's state (the template's noise settings do not change its structure)."""
    _, params = init_transformer(config, finetune=True)
    ema = bool(config.dp.ema_decay)
    template = init_dp_state(params, transformer_lib.trainable_mask(params, config.dp.trainable),
                             dp_optimizer(config, 0.0, 1.0, 0), ema)
    state = restore_params(dp_dir, template)
    return state.extra if ema else state.params


def secret_seed(config: ml_collections.ConfigDict, stage_dir: str) -> tuple[int, str]:
    """The seed of the Poisson draws and the noise, and how it was chosen.

    Unless `dp.secret_seed` is set (reproducibility mode), it is drawn once from the OS and kept in
    `<stage_dir>/secret_seed.json` (owner-only), so a resumed run continues the same draws.
    """
    if config.dp.secret_seed is not None:
        return int(config.dp.secret_seed), "set in the config (reproducibility mode: NOT secret)"
    path = os.path.join(stage_dir, "secret_seed.json")
    if not os.path.exists(path):
        if jax.process_count() > 1:
            raise ValueError("multi-host DP runs need dp.secret_seed shared by every process; draw one with "
                             "`python -c 'import secrets; print(secrets.randbits(62))'` and keep it private")
        os.makedirs(stage_dir, exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"secret_seed": secrets.randbits(62)}, f)
        os.replace(tmp, path)
    with open(path) as f:
        return int(json.load(f)["secret_seed"]), f"drawn from the OS, kept secret in {path}"


def _draws(sampler_state: dict) -> dict:
    """The sampler settings that decide each step's examples. The padding (`bucket_multiple`, `buckets`)
    follows the device count, so a checkpoint may resume on another one; a changed truncation size
    shows up in the ledger's `max_batch_size`."""
    return {k: v for k, v in sampler_state.items() if k not in ("bucket_multiple", "buckets")}


class DpFinetune:
    """Builds the DP stage's `loop.Task` and keeps its ledger, sampler and guard."""

    def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh, *, stage_dir: str, tokenizer_dir: str,
                 pretrain_dir: str):
        self.config = config
        seed, self.seed_origin = secret_seed(config, stage_dir)
        dp = config.dp
        source = builders.load(config, "private")
        expected = "public" if dp.tuning else "private"  # a tuning run's DP input stands in for the private data
        if source.privacy != expected:
            raise data.PrivacyError(f"the DP stage expects config.data.private to be tagged {expected}"
                                    f"{' (dp.tuning)' if dp.tuning else ''}, got {source.privacy}")
        self.examples = encode_examples(config, load_tokenizer(config, tokenizer_dir), source)
        n = len(source)
        bucket = (dp.microbatch_size or 1) * jax.device_count()
        q = dp.expected_batch_size / dp_recipe.simulated_private_size(config, n)
        self.sampler = data.PoissonSampler(n, q, seed=seed, bucket_multiple=bucket)
        self.params = dp_params(config, n, self.sampler)
        self.ledger = privacy.PrivacyLedger(self.params)
        self.guard = None if self.params.target_epsilon is None else privacy.BudgetGuard(self.ledger)

        # The pretrained model, plus the DP stage's LoRA adapters (zero B: the same function) when dp.lora_rank > 0.
        graphdef, params = init_transformer(config, finetune=True)
        params = dp_recipe.load_pretrained(params, restore_params(pretrain_dir, init_pretrain(config)[1]).params)
        trainable = transformer_lib.trainable_mask(params, dp.trainable)
        self.optimizer = dp_optimizer(config, self.params.noise_multiplier, self.sampler.expected_batch_size, seed)
        self.state = distributed.replicate(init_dp_state(params, trainable, self.optimizer, bool(dp.ema_decay)), mesh)

        def example_loss(params, example, key):
            return transformer_lib.per_example_loss(graphdef, params, example, key)

        # step_fn(state, batch, mask, key, step): the step's key is folded inside the jitted call.
        self.step_fn = steps.fold_step_key(steps.dp_step(example_loss, self.optimizer, mesh, l2_clip=dp.l2_clip,
                                                         microbatch_size=dp.microbatch_size or None,
                                                         trainable=trainable, use_ghost_norms=dp.use_ghost_norms))
        self.step_fn = dp_recipe.with_ema(self.step_fn, dp.ema_decay)
        self.mesh = mesh
        self.key = stage_key(config, "dp_finetune")
        self.last_epsilon = 0.0

    def step(self, state, i):
        indices, mask = self.sampler.batch(i)
        batch = {k: v[local_slice(indices)] for k, v in self.examples.items()}
        batch = distributed.shard_batch(batch, self.mesh)
        state, metrics = self.step_fn(state, batch, distributed.shard_batch(local_slice(mask), self.mesh),
                                      self.key, i)
        self.ledger.record_steps(1)
        if not self.config.dp.log_private_metrics:
            metrics = {}
        return state, metrics

    def before_step(self, i: int) -> None:
        if self.ledger.steps != i:
            raise RuntimeError(f"privacy ledger holds {self.ledger.steps} steps but the run is at step {i}")
        if self.guard is not None and not self.guard.can_step(1):
            raise loop.StopStage(f"privacy budget: one more step would exceed epsilon "
                                 f"{self.params.target_epsilon} (now {self.ledger.epsilon():.4g})")

    def after_step(self, i: int) -> dict:
        if i % self.config.log_every_steps and i != self.config.dp.steps:
            return {}
        self.last_epsilon = self.ledger.epsilon()
        return {"epsilon": self.last_epsilon}

    def meta(self) -> dict:
        return {"ledger": self.ledger.to_dict(), "sampler": self.sampler.state_dict()}

    def on_restore(self, meta: dict) -> None:
        saved = privacy.PrivacyLedger.from_dict(meta["ledger"])
        differences = saved.check_compatible(self.params, compose=self.config.dp.compose_on_resume)
        if differences:
            logging.warning("DP hyperparameters changed on resume and are composed honestly: %s", differences)
        if not differences and _draws(meta["sampler"]) != _draws(self.sampler.state_dict()):
            raise privacy.LedgerMismatchError(
                f"the Poisson sampler differs from the checkpoint's: {meta['sampler']} (checkpoint) vs "
                f"{self.sampler.state_dict()} (config); use a new workdir")
        self.ledger = saved
        self.guard = None if self.params.target_epsilon is None else privacy.BudgetGuard(self.ledger)

    def summary(self) -> dict:
        report = privacy.privacy_report(self.ledger)
        return {"epsilon": self.ledger.epsilon(), "delta": self.params.delta,
                "noise_multiplier": self.params.noise_multiplier, "sampling_prob": self.params.sampling_prob,
                "steps": self.ledger.steps, "privacy": {**report, "seed": self.seed_origin},
                "statement": privacy.privacy_statement(self.ledger) + f"\n  sampling and noise seed: {self.seed_origin}",
                "ledger": self.ledger.to_dict()}

    def task(self) -> loop.Task:
        ema = bool(self.config.dp.ema_decay)  # the parameters the sample stage loads
        return loop.Task("dp_finetune", self.state, self.step, self.config.dp.steps,
                         params_of=lambda s: s.extra if ema else s.params,
                         meta=self.meta, on_restore=self.on_restore, before_step=self.before_step,
                         after_step=self.after_step, summary_extra=self.summary)

