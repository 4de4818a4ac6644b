"""What a stage is: a name, whether its result is public, its random stream, the settings it reads, the stages
it consumes, how it runs and how its parameters are restored.

A training stage builds a `loop.Task` (`build`) that `loop.run` runs, or writes its own loop over the machinery of
`loop.StageLoop` (`train`: the DP-SGD stages); either checkpoints it with its inputs and resumes it bit-exactly.
`run` is that, or (sample, evaluate) the stage's own one-shot computation.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import numpy as np
import optax
from jax.sharding import Mesh

from dpwave.train import distributed, loop, steps, streams
from dpwave.train.checkpoint import Checkpointer
from dpwave.train.fingerprints import jsonable
from dpwave.train.settings import Settings


@dataclasses.dataclass(frozen=True)
class Context:
    """What a running stage sees: the settings, the workdir, the data mesh and every stage's JSON inputs."""

    settings: Settings
    workdir: str
    mesh: Mesh
    inputs: Mapping[str, Mapping[str, Any]]

    def dir(self, stage: str) -> str:
        return f"{self.workdir}/{stage}"

    @property
    def loop_options(self) -> loop.LoopOptions:
        """The run's checkpoint and logging cadence and input workers."""
        ops, perf = self.settings.ops, self.settings.perf
        return loop.LoopOptions(ops.checkpoint_every, ops.max_to_keep, ops.log_every,
                                loop.InputFeed(perf.input_workers, perf.input_prefetch))

    def stage_loop(self, stage: Stage) -> loop.StageLoop:
        """The loop machinery of `stage` in its directory, with its inputs (checked on resume, recorded) and its
        privacy."""
        return loop.StageLoop(stage.name, self.dir(stage.name), self.loop_options, inputs=self.inputs[stage.name],
                              reconciled_on_resume=stage.reconciled_on_resume, private=not stage.public)


class Stage:
    """One stage of a run, in `<workdir>/<name>`.

    `public`: the result is a function of public data only (it reads no private data and consumes only public
    stages), so `experiments/reproduce.py` may copy it between runs with equal inputs. `stream`: folded into
    `config.seed` for the stage's randomness. `consumes`: the stages whose artifacts it reads (their
    fingerprints are part of its inputs). `dp`: the run's DP stage (it spends the privacy budget; its summary
    holds the ledger and the statement). `reconciled_on_resume`: input paths a resumed checkpoint may differ in
    because the stage checks them itself on restore (the DP stage's mechanism: the privacy ledger).
    """

    name: ClassVar[str]
    public: ClassVar[bool]
    stream: ClassVar[int | None]
    consumes: ClassVar[tuple[str, ...]] = ()
    dp: ClassVar[bool] = False
    reconciled_on_resume: ClassVar[tuple[str, ...]] = ()

    def enabled(self, settings: Settings) -> bool:
        """Whether the run has this stage (the public-only control has no DP stage)."""
        return True

    def inputs(self, settings: Settings) -> dict[str, Any]:
        """The settings the stage's result depends on, keyed by their config path."""
        raise NotImplementedError

    def key(self, settings: Settings) -> jax.Array:
        return streams.stage_key(settings.seed, self.stream)

    def build(self, ctx: Context) -> loop.Task:
        """The training task (a training stage)."""
        raise NotImplementedError(f"stage {self.name!r} is not a training stage")

    def task(self, ctx: Context) -> loop.Task:
        """`build(ctx)` with the stage's inputs (checked on resume, recorded) and its privacy."""
        return dataclasses.replace(self.build(ctx), inputs=ctx.inputs[self.name],
                                   reconciled_on_resume=self.reconciled_on_resume, private=not self.public)

    def train(self, ctx: Context) -> loop.LoopResult:
        """Runs or resumes the training stage's loop: `loop.run` of its task, unless the stage writes its own."""
        return run_task(ctx, self.task(ctx))

    def run(self, ctx: Context) -> bool:
        """Runs or resumes the stage; False when it was preempted (the same command continues it)."""
        return self.train(ctx).finished


def run_task(ctx: Context, task: loop.Task) -> loop.LoopResult:
    """Runs or resumes `task` in its stage directory with the run's checkpoint and logging frequency and input
    workers."""
    options = ctx.loop_options
    return loop.run(task, ctx.dir(task.name), checkpoint_every=options.checkpoint_every,
                    max_to_keep=options.max_to_keep, log_every=options.log_every, feed=options.feed)


def training_inputs(name: str, section: Any) -> dict[str, Any]:
    """A public stage's own config section as inputs, with `init_params_from` replaced by the source's
    params_sha256 (moving the source's workdir changes nothing)."""
    out = jsonable(dataclasses.replace(section, init_params_from=None))
    del out["init_params_from"]
    if section.init_params_from:
        out["init_params_sha256"] = init_source(section.init_params_from, name)[1]
    return {name: out}


def public_task(stage: Stage, ctx: Context, state: steps.TrainState, optimizer: optax.GradientTransformation,
                loss_fn: steps.BatchLoss, training: Any, size: int, get_batch: Callable[[np.ndarray], Any],
                section: str | None = None) -> loop.Task:
    """The loop task of a public training stage: `training.steps` data-parallel steps of `loss_fn` on batches
    `get_batch(indices)` of a shuffled order over `size` examples (seeded by config.seed, the stage's stream and
    `section`, default the stage's name), from `state` or from `training.init_params_from`'s parameters."""
    settings, mesh = ctx.settings, ctx.mesh
    if training.init_params_from:
        source_dir = init_source(training.init_params_from, stage.name)[0]
        state = dataclasses.replace(state, params=stage.restore_params(settings, source_dir))
    state = distributed.replicate(state, mesh)
    step_fn = steps.public_step(loss_fn, optimizer, mesh)
    sampler = streams.shuffled(settings.seed, stage.stream, size, training.batch_size, section or stage.name)
    key = stage.key(settings)

    def batch(i):
        return get_batch(distributed.local_slice(sampler.batch(i)))

    def step(state, batch, i):
        return step_fn(state, distributed.shard_batch(batch, mesh), jax.random.fold_in(key, i))

    return loop.Task(stage.name, state, step, training.steps, params_of=lambda s: s.params, batch=batch)


def restore_state(stage_dir: str, template: Any) -> Any:
    """The newest state checkpointed in `stage_dir`, restored against `template` (the stage's initial state)."""
    with Checkpointer(f"{stage_dir}/checkpoints") as ckpt:
        restored = ckpt.restore_latest(template)
    if restored is None:
        raise FileNotFoundError(f"no checkpoint under {stage_dir}/checkpoints; run that stage first")
    return restored[1]


def init_source(path: str, stage: str) -> tuple[str, str]:
    """(stage directory, params_sha256) of the finished `stage` that `<stage>.init_params_from=path` names: the
    stage's own directory, or a workdir holding it."""
    for candidate in (path, os.path.join(path, stage)):
        summary = loop.read_summary(candidate)
        if summary is None:
            continue
        if summary.get("stage") != stage:
            raise ValueError(f"config.{stage}.init_params_from={path!r} is a finished {summary.get('stage')!r} stage; "
                             f"it needs a finished {stage!r} stage directory or a workdir holding one")
        return candidate, summary["params_sha256"]
    raise ValueError(f"config.{stage}.init_params_from={path!r} holds no finished {stage!r} stage (no "
                     f"{os.path.join(path, 'summary.json')} nor {os.path.join(path, stage, 'summary.json')}); point "
                     "it at a finished stage directory or a workdir")
