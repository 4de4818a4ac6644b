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
import stat

import jax
import ml_collections
import optax
from absl import logging
from jax.sharding import Mesh

from dpwave import data, privacy
from dpwave.data.sampling import seed_commitment
from dpwave.models import transformer as transformer_lib
from dpwave.train import builders, distributed, dp_recipe, loop, steps
from dpwave.train.public_stages import (encode_examples, init_pretrain, init_transformer, load_tokenizer,
                                        local_slice, restore_params)


def calibrated_noise(config: ml_collections.ConfigDict, dataset_size: int) -> float:
    """sigma: given by config, 0 for the non-private reference (target epsilon inf), else calibrated so
    that `dp.steps` steps give epsilon <= target."""
    dp = config.dp
    if dp.noise_multiplier is not None:
        return float(dp.noise_multiplier)
    if math.isinf(dp.target_epsilon):
        return 0.0
    return privacy.calibrate_noise(dp.target_epsilon, dp.delta, dp.expected_batch_size / dataset_size, dp.steps,
                                   accountant=dp.accountant, neighboring=dp.neighboring)


def mechanism(config: ml_collections.ConfigDict, dataset_size: int) -> privacy.DpSgdMechanism:
    """The DP stage's mechanism over a DP input of `dataset_size` examples (config -> mechanism, built once)."""
    dp = config.dp
    simulated = dp_recipe.simulated_private_size(config, dataset_size)
    return privacy.DpSgdMechanism(dp.l2_clip, privacy.DpParams(
        # A tuning run keeps the noise per step sigma/B of the private run it simulates (dp_recipe.noise_scale).
        noise_multiplier=calibrated_noise(config, simulated) * dp_recipe.noise_scale(config, dataset_size),
        sampling_prob=float(dp.expected_batch_size / simulated), delta=dp.delta, accountant=dp.accountant,
        target_epsilon=None if math.isinf(dp.target_epsilon) or dp.tuning else dp.target_epsilon,
        dataset_size=dataset_size, allow_large_delta=dp.allow_large_delta, neighboring=dp.neighboring))


def init_dp_state(params, trainable, optimizer: optax.GradientTransformation, ema: bool = False) -> steps.TrainState:
    """The DP stage's state; with `ema`, `extra` holds the EMA of the parameters (starting at `params`)."""
    return steps.TrainState(params, optimizer.init(privacy.partition(params, trainable)[0]), params if ema else None)


def final_transformer_params(config: ml_collections.ConfigDict, dp_dir: str):
    """The DP-finetuned AR parameters (their EMA when `dp.ema_decay` > 0), restored against a template of the
    DP stage's state (the template's noise settings do not change its structure)."""
    _, params = init_transformer(config, finetune=True)
    ema = bool(config.dp.ema_decay)
    optimizer = privacy.dp_optimizer(dp_recipe.inner_optimizer(config.dp), l2_clip=1.0, noise_multiplier=0.0,
                                     expected_batch_size=1.0, key=0)
    template = init_dp_state(params, transformer_lib.trainable_mask(params, config.dp.trainable), optimizer, ema)
    state = restore_params(dp_dir, template)
    return state.extra if ema else state.params


SECRET_SEED_ENV = "DPWAVE_DP_SECRET_SEED"
SECRET_SEED_FILE = "secret_seed.json"
# Folded into jax.random.key(secret seed) for the DP step's per-example randomness (condition dropout): a
# stream apart from the noise key (optimizers.NOISE_STREAM) and the Poisson draws (numpy Philox).
DP_STEP_STREAM = 0x64707374  # "dpst"
_MAX_SEED = 2**63 - 1
_DRAW = "python -c 'import secrets; print(secrets.randbits(62))'"


class SecretSeedError(ValueError):
    """The DP secret seed's file or environment variable is missing, unreadable, not owner-only or malformed."""


def _new_seed_file(path: str) -> str:
    return f"(umask 077; {_DRAW} > {path})"


def _parse_seed(text: str, where: str, fix: str) -> int:
    """The decimal seed in `text`; the error never repeats the text (it may be a mistyped secret)."""
    text = text.strip()
    if not (text.isascii() and text.isdigit()) or int(text) > _MAX_SEED:
        raise SecretSeedError(f"{where} must hold one decimal integer in [0, 2**63) and nothing else (its content "
                              f"is not shown); {fix}")
    return int(text)


def read_seed_file(path: str) -> int:
    """The seed in the owner-only file `path`, which holds one decimal integer."""
    where = f"dp.secret_seed_file {path!r}"
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise SecretSeedError(f"{where} does not exist; create it with {_new_seed_file(path)}") from None
    except OSError as e:
        raise SecretSeedError(f"{where} cannot be read ({e.strerror}); make it a file you own and can read "
                              f"(chmod 600 {path})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SecretSeedError(f"{where} is not a regular file; point dp.secret_seed_file at a file holding "
                                  "the seed")
        if info.st_mode & 0o077:
            raise SecretSeedError(f"{where} has mode {stat.S_IMODE(info.st_mode):04o}: group or other users may "
                                  f"access it; make it owner-only with chmod 600 {path}")
        raw = os.read(fd, 4096)
    finally:
        os.close(fd)
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        text = ""
    return _parse_seed(text, where, f"write a fresh one with {_new_seed_file(path)}")


def seed_source(config: ml_collections.ConfigDict) -> tuple[int, str] | None:
    """The DP secret seed given by `dp.secret_seed`, `dp.secret_seed_file` or the environment variable
    DPWAVE_DP_SECRET_SEED, with how it was given; None when the stage draws its own (single host only).

    Raises SecretSeedError for a bad file or variable, more than one source, or a multi-host run without one.
    """
    given = [name for name, value in (("dp.secret_seed", config.dp.secret_seed),
                                      ("dp.secret_seed_file", config.dp.secret_seed_file),
                                      (SECRET_SEED_ENV, os.environ.get(SECRET_SEED_ENV))) if value is not None]
    if len(given) > 1:
        raise SecretSeedError(f"the DP secret seed is given more than once ({', '.join(given)}); keep only one")
    if config.dp.secret_seed is not None:
        return int(config.dp.secret_seed), "set in the config (reproducibility mode: NOT secret)"
    if config.dp.secret_seed_file is not None:
        return (read_seed_file(config.dp.secret_seed_file),
                "read from the owner-only file dp.secret_seed_file (secret)")
    if SECRET_SEED_ENV in os.environ:
        seed = _parse_seed(os.environ[SECRET_SEED_ENV], SECRET_SEED_ENV,
                           f"set it to the output of {_DRAW} (the same on every host)")
        return seed, f"read from the environment variable {SECRET_SEED_ENV} (secret)"
    if jax.process_count() > 1:
        raise SecretSeedError(
            "a multi-host DP run needs the same secret seed on every host: set dp.secret_seed_file to an owner-only "
            f"file every host can read (write one with {_new_seed_file('FILE')}), or export {SECRET_SEED_ENV} on "
            "every host")
    return None


def secret_seed(config: ml_collections.ConfigDict, stage_dir: str) -> tuple[int, str]:
    """The seed of the Poisson draws, the noise and the DP step's per-example randomness, and how it was given.

    Unless `seed_source` gives one, it is drawn once from the OS and kept in `<stage_dir>/secret_seed.json`
    (owner-only, in an owner-only directory), so a resumed run continues the same draws.
    """
    given = seed_source(config)
    if given is not None:
        return given
    path = os.path.join(stage_dir, SECRET_SEED_FILE)
    if not os.path.exists(path):
        loop.private_dir(stage_dir)
        tmp = f"{path}.tmp{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"secret_seed": secrets.randbits(62)}, f)
        os.replace(tmp, path)
    with open(path) as f:
        return (int(json.load(f)["secret_seed"]),
                f"drawn from the OS, kept owner-only in the workdir ({os.path.basename(stage_dir)}/{SECRET_SEED_FILE})")


def _draws(sampler_state: dict) -> dict:
    """The sampler settings that decide each step's examples. The padding (`bucket_multiple`, `buckets`)
    follows the device count, so a checkpoint may resume on another one; a changed truncation size
    shows up in the ledger's `max_batch_size`. The seed is compared through its commitment (checkpoints
    written before it existed hold the plain seed)."""
    draws = {k: v for k, v in sampler_state.items() if k not in ("bucket_multiple", "buckets")}
    if "seed" in draws:
        draws["seed_commitment"] = seed_commitment(draws.pop("seed"))
    return draws


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
        self.mechanism = mechanism(config, len(source))
        selection = self.mechanism.selection
        self.sampler = data.PoissonSampler(selection.dataset_size, selection.sampling_prob, seed=seed,
                                           bucket_multiple=(dp.microbatch_size or 1) * jax.device_count())
        self.params = self.mechanism.params
        self.ledger = self.mechanism.ledger()
        self.guard = self.mechanism.guard(self.ledger)

        # The pretrained model, plus the DP stage's LoRA adapters (zero B: the same function) when dp.lora_rank > 0.
        graphdef, params = init_transformer(config, finetune=True)
        params = dp_recipe.load_pretrained(params, restore_params(pretrain_dir, init_pretrain(config)[1]).params)
        trainable = transformer_lib.trainable_mask(params, dp.trainable)
        self.optimizer = self.mechanism.optimizer(dp_recipe.inner_optimizer(dp), privacy.noise_key(seed))
        self.state = distributed.replicate(init_dp_state(params, trainable, self.optimizer, bool(dp.ema_decay)), mesh)

        def example_loss(params, example, key):
            return transformer_lib.per_example_loss(graphdef, params, example, key)

        # step_fn(state, batch, mask, key, step): the step's key is folded inside the jitted call.
        clipped_sum = self.mechanism.clipped_sum(example_loss, microbatch_size=dp.microbatch_size or None,
                                                 trainable=trainable, use_ghost_norms=dp.use_ghost_norms)
        self.step_fn = steps.fold_step_key(steps.dp_step(clipped_sum, self.optimizer, mesh,
                                                         l2_clip=self.mechanism.l2_clip, trainable=trainable))
        self.step_fn = dp_recipe.with_ema(self.step_fn, dp.ema_decay)
        self.mesh = mesh
        self.key = jax.random.fold_in(jax.random.key(seed), DP_STEP_STREAM)
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
        return {"ledger": self.ledger.to_dict(), "sampler": self.sampler.checkpoint_state()}

    def on_restore(self, meta: dict) -> None:
        saved = privacy.PrivacyLedger.from_dict(meta["ledger"])
        differences = saved.check_compatible(self.params, compose=self.config.dp.compose_on_resume)
        if differences:
            logging.warning("DP hyperparameters changed on resume and are composed honestly: %s", differences)
        saved_sampler, sampler = _draws(meta["sampler"]), _draws(self.sampler.checkpoint_state())
        if not differences and saved_sampler != sampler:
            changed = sorted(k for k in saved_sampler.keys() | sampler.keys() if saved_sampler.get(k) != sampler.get(k))
            raise privacy.LedgerMismatchError(
                f"the Poisson sampler differs from the checkpoint's in {', '.join(changed)} (a different "
                "seed_commitment means another DP secret seed); restore the original settings and seed, or use a new "
                "workdir")
        self.ledger = saved
        self.guard = self.mechanism.guard(self.ledger)

    def summary(self) -> dict:
        report = privacy.privacy_report(self.ledger)
        return {"epsilon": self.ledger.epsilon(), "delta": self.params.delta,
                "noise_multiplier": self.params.noise_multiplier, "sampling_prob": self.params.sampling_prob,
                "steps": self.ledger.steps, "privacy": {**report, "seed": self.seed_origin},
                "statement": (privacy.privacy_statement(self.ledger)
                              + f"\n  sampling and noise seed: {self.seed_origin}"),
                "ledger": self.ledger.to_dict()}

    def task(self) -> loop.Task:
        ema = bool(self.config.dp.ema_decay)  # the parameters the sample stage loads
        return loop.Task("dp_finetune", self.state, self.step, self.config.dp.steps,
                         params_of=lambda s: s.extra if ema else s.params,
                         meta=self.meta, on_restore=self.on_restore, before_step=self.before_step,
                         after_step=self.after_step, summary_extra=self.summary, private=True)

