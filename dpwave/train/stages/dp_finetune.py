"""The DP finetuning stage (private): the only stage that reads private data, and the DP-SGD loop it shares with
the pixel-space baseline (`dp_diffusion`).

Private images are mapped example by example to tokens with the frozen public tokenizer. One DP update, in the
order `DpSgdRun` builds and runs it, all numbers from one mechanism (`settings.Mechanism.build`:
`privacy.DpSgdMechanism`):

1. Poisson selection: step i's examples are a pure function of (secret seed, i) (`batch`, on the input workers);
2. the jitted step (`steps.dp_step`, built once in `build`): the step key fold_in(secret key, i), each example's
   key from its content, the sum of per-example gradients clipped to C, added across devices, the Gaussian noise
   once on that sum divided by the expected batch size, the inner optimizer (SGD, Adam), the EMA;
3. the ledger records the step; the budget guard refuses a step that would push epsilon past the target;
4. the checkpoint holds the state, the ledger and the sampler state; a rerun restores them and refuses changed DP
   hyperparameters (unless `dp.operations.compose_on_resume`).

`DpSgdRun.train` is that loop, top to bottom, over the machinery of `loop.StageLoop`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh

from dpwave import privacy
from dpwave.models import transformer as transformer_lib
from dpwave.train import ar_examples, distributed, dp_recipe, loop, steps
from dpwave.train.fingerprints import jsonable
from dpwave.train.settings import Mechanism, Settings
from dpwave.train.stages.base import Context, Stage, restore_state
from dpwave.train.stages.dp_account import DpAccount
from dpwave.train.stages.pretrain import STAGE as PRETRAIN
from dpwave.train.stages.tokenizer import STAGE as TOKENIZER

def init_state(params: nnx.State, trainable: Any, optimizer: optax.GradientTransformation,
               ema: bool = False) -> steps.TrainState:
    """The DP stage's state; with `ema`, `extra` holds the EMA of the parameters (starting at a copy of `params`:
    the step donates its state, and a buffer cannot be donated twice)."""
    extra = jax.tree.map(jnp.copy, params) if ema else None
    return steps.TrainState(params, optimizer.init(privacy.partition(params, trainable)[0]), extra)


# The DP-SGD mechanism's settings may change on resume: the ledger refuses them unless
# dp.operations.compose_on_resume composes them honestly (the clipping norm is outside the ledger: it must not change).
DP_SGD_RECONCILED = tuple(f"dp.{f.name}" for f in dataclasses.fields(Mechanism) if f.name != "l2_clip")


def state_template(settings: Settings, params: nnx.State, trainable: Any) -> steps.TrainState:
    """The structure of a DP-SGD stage's state (what its checkpoints restore against): the optimizer state of
    `optax.chain(noise, inner)` is (the noise's key data and step count, the inner optimizer's state); no DP
    optimizer is built."""
    recipe = settings.dp.recipe
    inner = dp_recipe.inner_optimizer(recipe, settings.dp.mechanism.steps)
    noise = privacy.NoiseState(key=jnp.zeros((2,), jnp.uint32), count=jnp.zeros((), jnp.int32))
    opt_state = (noise, inner.init(privacy.partition(params, trainable)[0]))
    return steps.TrainState(params, opt_state, params if recipe.ema_decay else None)


def _draws(sampler_state: dict) -> dict:
    """The sampler settings that decide each step's examples. The padding (`bucket_multiple`, `buckets`)
    follows the device count, so a checkpoint may resume on another one; a changed truncation size
    shows up in the ledger's `max_batch_size`. The seed is compared through its commitment (checkpoints
    written before it existed hold the plain seed)."""
    draws = {k: v for k, v in sampler_state.items() if k not in ("bucket_multiple", "buckets")}
    if "seed" in draws:
        draws["seed_commitment"] = privacy.seed_commitment(draws.pop("seed"))
    return draws


class DpSgdRun(DpAccount):
    """One DP-SGD run over a DP input's `examples`: the mechanism, Poisson sampler, ledger, guard and jitted step.
    A subclass opens its model and calls `build` (the transformer's `DpRun`, the pixel model's stage)."""

    def build(self, mesh: Mesh, examples: dict[str, np.ndarray], params: nnx.State, trainable: Any,
              example_loss: Any) -> None:
        """The DP update of `example_loss(params, example, key)` over `examples` (host arrays, one row per DP
        example), in the order a step runs it: the Poisson sampler (`batch`), the clipped sum of per-example
        gradients, the noise and the optimizer, all three from the one mechanism; the jitted step built from them
        (`steps.dp_step`: per-example keys, clipped sum, psum, noise, optimizer, EMA). `train` runs the loop."""
        settings, dp, secret = self.settings, self.settings.dp, self.secret
        self.examples, self.mesh = examples, mesh
        self.sampler = self.mechanism.selection.sampler(
            secret.poisson_seed(), bucket_multiple=(settings.perf.microbatch_size or 1) * jax.device_count())
        clipped_sum = self.mechanism.clipped_sum(example_loss, microbatch_size=settings.perf.microbatch_size,
                                                 trainable=trainable, use_ghost_norms=settings.perf.use_ghost_norms)
        self.optimizer = self.mechanism.optimizer(dp_recipe.inner_optimizer(dp.recipe, dp.mechanism.steps),
                                                  *secret.noise_keys())
        self.step_fn = steps.dp_step(clipped_sum, self.optimizer, mesh, trainable=trainable,
                                     ema_decay=dp.recipe.ema_decay)
        self.key = secret.step_key()
        self.state = distributed.replicate(init_state(params, trainable, self.optimizer, bool(dp.recipe.ema_decay)),
                                           mesh)

    def batch(self, i: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Step i's examples and mask: this process's share of the Poisson draw `sampler.batch(i)` (padded slots
        hold example 0, masked out). A pure function of (secret seed, i), run on the input workers."""
        indices, mask = self.sampler.batch(i)
        return {k: v[distributed.local_slice(indices)] for k, v in self.examples.items()}, distributed.local_slice(mask)

    def meta(self) -> dict:
        return {"ledger": self.ledger.to_dict(), "sampler": self.sampler.checkpoint_state()}

    def on_restore(self, meta: dict) -> None:
        saved, differences = self.saved_ledger(meta)
        saved_sampler, sampler = _draws(meta["sampler"]), _draws(self.sampler.checkpoint_state())
        if not differences and saved_sampler != sampler:
            changed = sorted(k for k in saved_sampler.keys() | sampler.keys() if saved_sampler.get(k) != sampler.get(k))
            raise privacy.LedgerMismatchError(
                f"the Poisson sampler differs from the checkpoint's in {', '.join(changed)} (a different "
                "seed_commitment means another DP secret seed); restore the original settings and seed, or use a new "
                "workdir")
        self.use_ledger(saved)

    def train(self, stage_loop: loop.StageLoop) -> loop.LoopResult:
        """The DP stage's loop over `dp.mechanism.steps` steps, resumed from its newest checkpoint (ledger and sampler
        state restored and checked by `on_restore`)."""
        total, settings = self.settings.dp.mechanism.steps, self.settings
        with stage_loop:
            state, step = stage_loop.restore(self.state, self.on_restore)
            for i, (examples, mask) in stage_loop.batches(self.batch, total):  # step i's Poisson draw (`batch`)
                try:
                    self.before_step(i)  # the ledger holds i steps and the budget allows one more
                except loop.StopStage as stop:
                    stage_loop.stop_early(i, str(stop))
                    break
                # Per-example keys, clipped sum, psum, noise, optimizer and EMA: one jitted call (`build`).
                state, metrics = self.step_fn(state, distributed.shard_batch(examples, self.mesh),
                                              distributed.shard_batch(mask, self.mesh), self.key, i)
                self.ledger.record_steps(1)
                step = i + 1
                # Epsilon is computed on the log steps; the bar shows the last one (none before the first).
                logged = stage_loop.logs(step)
                if logged:
                    self.last_epsilon = self.ledger.epsilon()
                private_metrics = metrics if settings.dp.operations.log_private_metrics else {}
                if stage_loop.end_step(step, state, private_metrics, meta=self.meta,
                                       extra={"epsilon": self.last_epsilon} if logged else {},
                                       postfix={"eps": f"{self.last_epsilon:.3g}"} if logged else None):
                    return stage_loop.result  # preempted: the same command resumes it
            return stage_loop.finish(state, step, state.extra if settings.dp.recipe.ema_decay else state.params,
                                     meta=self.meta, summary_extra=self.summary())


class DpRun(DpSgdRun):
    """The DP finetuning of the pretrained AR transformer over the private images' tokens."""

    def __init__(self, settings: Settings, mesh: Mesh, *, stage_dir: str, tokenizer_dir: str, pretrain_dir: str):
        super().__init__(settings, stage_dir)
        examples = ar_examples.encode_examples(settings, TOKENIZER.model(settings, tokenizer_dir), self.source)
        # The pretrained model, plus the DP stage's LoRA adapters (zero B: the same function) when
        # dp.recipe.lora_rank > 0.
        graphdef, params = ar_examples.init_transformer(settings.dp_transformer, PRETRAIN.key(settings))
        params = dp_recipe.load_pretrained(params, PRETRAIN.restore_params(settings, pretrain_dir))

        def example_loss(params, example, key):
            return transformer_lib.per_example_loss(graphdef, params, example, key)

        self.build(mesh, examples, params, transformer_lib.trainable_mask(params, settings.dp.recipe.trainable),
                   example_loss)


class DpFinetune(Stage):
    """`stream` is None: the stage's randomness comes from the DP secret seed, never from config.seed."""

    name = "dp_finetune"
    public = False
    stream = None
    dp = True
    consumes = ("tokenizer", "pretrain")
    reconciled_on_resume = DP_SGD_RECONCILED

    def enabled(self, settings: Settings) -> bool:
        return not settings.public_only

    def inputs(self, settings: Settings) -> dict[str, Any]:
        dp = settings.dp
        return {"data.private": jsonable(settings.data.specs["private"]),
                "transformer": jsonable(settings.dp_transformer),
                "dp": {**jsonable(dp.mechanism), **jsonable(dp.recipe), "secret_seed": dp.secret.seed}}

    def train(self, ctx: Context) -> loop.LoopResult:
        return DpRun(ctx.settings, ctx.mesh, stage_dir=ctx.dir(self.name), tokenizer_dir=ctx.dir(TOKENIZER.name),
                     pretrain_dir=ctx.dir(PRETRAIN.name)).train(ctx.stage_loop(self))

    def init(self, settings: Settings) -> tuple[nnx.GraphDef, steps.TrainState]:
        """(graphdef, a template of the stage's state: its structure, not its noise settings)."""
        graphdef, params = ar_examples.init_transformer(settings.dp_transformer, PRETRAIN.key(settings))
        return graphdef, state_template(settings, params,
                                        transformer_lib.trainable_mask(params, settings.dp.recipe.trainable))

    def restore_params(self, settings: Settings, stage_dir: str) -> nnx.State:
        """The DP-finetuned AR parameters (their EMA when `dp.recipe.ema_decay` > 0)."""
        state = restore_state(stage_dir, self.init(settings)[1])
        return state.extra if settings.dp.recipe.ema_decay else state.params


STAGE = DpFinetune()
