"""The resumable step loop every training stage runs: restore, step, log, checkpoint, preempt.

A stage provides a `Task`: its initial state (a pytree), a host-side `batch(step_index)` and a pure
`step(state, batch, step_index) -> (state, metrics)` whose randomness and data are functions of (seed, step_index)
only, and JSON `meta`
(sampler state, privacy ledger) saved beside the state together with the stage's `inputs` (the settings it
reads and the fingerprints of the stages it consumes). Because of that, a run killed at any step and rerun
restores the newest checkpoint and continues bit-identically, and a rerun under other inputs is refused
(`fingerprints.StaleStageError`) instead of continuing a different computation.

Faults: a damaged newest checkpoint falls back to an older one (one warning line); when none restores the stage
stops with `CheckpointRestoreError` naming the folder and the fix, and never starts over by itself (the DP stage's
privacy ledger lives in its checkpoints). A full disk stops it with `files.DiskFullError`; the checkpoints and
summaries written before are intact and the same command resumes once there is room.

`batch` runs on input worker threads a few steps ahead (`dpwave.data.prefetch`); the time the loop waits for the
next batch, over the stage's wall time, is its input-wait fraction (metrics, summary and log of a public stage;
PRIVATE_TIMING of a private one).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Any, Callable, Iterator, Mapping

import jax
from absl import logging

from dpwave import files
from dpwave.data.prefetch import prefetched
from dpwave.train import fingerprints, hashing
from dpwave.train.checkpoint import Checkpointer, CheckpointRestoreError, PreemptionGuard
from dpwave.train.metrics import MetricWriter, Progress

SUMMARY = "summary.json"
PRIVATE_TIMING = "private_timing.json"


class StopStage(Exception):
    """Raised by `Task.before_step` to end a stage early and cleanly (e.g. the privacy budget)."""


@dataclasses.dataclass
class Task:
    """What a stage trains. `batch(i)` is step i's input (host arrays; a pure function of i, thread-safe: it runs
    on input workers ahead of the step) and `step(state, batch, i)` consumes it. `params_of(state)` picks the
    parameters hashed in the summary.

    A `private` stage reads private data: its directory and every file it writes are owner-only, and its
    wall time and input wait (which depend on its private draws) go to the owner-only PRIVATE_TIMING, not the
    summary, the metrics or the log.
    `inputs` (JSON, `fingerprints`) go into every checkpoint and the summary; a checkpoint written under other
    inputs is refused, except in the paths of `reconciled_on_resume`, which `on_restore` checks itself.
    `postfix()` is shown beside the progress bar.
    """

    name: str
    init_state: Any
    step: Callable[[Any, Any, int], tuple[Any, Mapping[str, Any]]]
    total_steps: int
    params_of: Callable[[Any], Any]
    batch: Callable[[int], Any] = lambda step: None
    meta: Callable[[], dict] = dict
    on_restore: Callable[[dict], None] = lambda meta: None
    before_step: Callable[[int], None] = lambda step: None
    after_step: Callable[[int], Mapping[str, Any]] = lambda step: {}
    summary_extra: Callable[[], dict] = dict
    private: bool = False
    inputs: Mapping[str, Any] | None = None
    reconciled_on_resume: tuple[str, ...] = ()
    postfix: Callable[[], Mapping[str, Any]] = dict


@dataclasses.dataclass(frozen=True)
class LoopResult:
    state: Any
    step: int
    finished: bool  # False when preempted: the caller exits 0 and a rerun resumes
    summary: dict | None


def read_summary(stage_dir: str) -> dict | None:
    return files.read_json(os.path.join(stage_dir, SUMMARY), None)


def write_json_atomic(path: str, data: Any) -> None:
    """Strict JSON (non-finite floats as "Infinity"/"NaN" strings), atomically, on process 0 (`dpwave.files`)."""
    files.write_json(path, data)


def write_summary(stage_dir: str, inputs: Mapping[str, Any] | None, summary: Mapping[str, Any]) -> dict:
    """Writes `<stage_dir>/summary.json`: `summary` plus the stage's `inputs` and their `inputs_sha256`."""
    if inputs is not None:
        summary = {**summary, "inputs_sha256": fingerprints.sha256(inputs), "inputs": inputs}
    write_json_atomic(os.path.join(stage_dir, SUMMARY), summary)
    return dict(summary)


def check_resume(task: Task, meta: Mapping[str, Any]) -> None:
    """Refuses a checkpoint whose recorded inputs differ from `task.inputs` outside `task.reconciled_on_resume`
    (a checkpoint without recorded inputs, written by an older dpwave, is only warned about)."""
    if task.inputs is None:
        return
    if "inputs" not in meta:
        logging.warning("[%s] the checkpoint records no inputs (written by an older dpwave); it cannot be checked "
                        "against this config and is resumed as is", task.name)
        return
    recorded = fingerprints.without(meta["inputs"], task.reconciled_on_resume)
    current = fingerprints.without(task.inputs, task.reconciled_on_resume)
    if recorded != current:
        raise fingerprints.StaleStageError(
            f"stage {task.name!r} was checkpointed under other inputs than this config gives (changed: "
            f"{', '.join(fingerprints.changed(recorded, current))}); an unfinished stage never resumes under changed "
            "inputs: restore the original values, or rerun with a new --workdir")


def _unreadable_checkpoints(task: Task, stage_dir: str, error: CheckpointRestoreError) -> str:
    """The one-line message of a stage none of whose checkpoints restores: the folder, and the two ways on."""
    over = (" (for the DP stage that starts a new privacy ledger that does not count the steps already taken on the "
            "private data: the run's privacy cost is then the new ledger's plus whatever the lost run released)"
            if task.private else "")
    return (f"stage {task.name!r}: {error}; restore that folder from a copy and rerun the same command, or delete "
            f"{stage_dir} to train the stage again from step 0{over}")


def private_dir(path: str) -> None:
    """Creates `path` if needed and makes it owner-only (0700 on a local disk)."""
    files.makedirs(path, private=True)


@contextlib.contextmanager
def _owner_only_files(enabled: bool) -> Iterator[None]:
    """umask 077 (process-wide) while a private stage runs, so its checkpoints and logs are owner-only."""
    previous = os.umask(0o077) if enabled else None
    try:
        yield
    finally:
        if previous is not None:
            os.umask(previous)


@dataclasses.dataclass(frozen=True)
class InputFeed:
    """How `Task.batch` runs: on `workers` threads up to `prefetch` steps ahead (0 workers: in the loop's thread
    when the step asks for it). It changes no batch, only when it is made."""

    workers: int = 0
    prefetch: int = 1


def run(task: Task, stage_dir: str, *, checkpoint_every: int, max_to_keep: int, log_every: int,
        feed: InputFeed = InputFeed()) -> LoopResult:
    """Runs `task` in `stage_dir` from its newest checkpoint to `task.total_steps`.

    Writes `summary.json` (final step, wall time and input-wait fraction unless `task.private`, params_sha256, plus
    `task.summary_extra()` and the inputs) when the stage finishes or is stopped by `StopStage`; on SIGTERM
    it saves and returns `finished=False`.
    """
    if task.private:
        private_dir(stage_dir)
    with _owner_only_files(task.private), _disk_full_is_one_error(stage_dir):
        return _run(task, stage_dir, checkpoint_every=checkpoint_every, max_to_keep=max_to_keep, log_every=log_every,
                    feed=feed)


@contextlib.contextmanager
def _disk_full_is_one_error(stage_dir: str) -> Iterator[None]:
    """A full disk ends the stage with one `files.DiskFullError`: the first one raised (a writer that fails again
    while closing, TensorBoard's, raises a plain OSError over it), else one naming the stage's folder."""
    try:
        yield
    except files.DiskFullError:
        raise
    except Exception as e:
        if not files.is_disk_full(e):
            raise
        first = e.__context__
        while first is not None and not isinstance(first, files.DiskFullError):
            first = first.__context__
        if first is None:
            raise files.DiskFullError(stage_dir, e) from e
        raise first from first.__cause__


def _run(task: Task, stage_dir: str, *, checkpoint_every: int, max_to_keep: int, log_every: int,
         feed: InputFeed) -> LoopResult:
    ckpt = Checkpointer(os.path.join(stage_dir, "checkpoints"), max_to_keep=max_to_keep,
                        save_interval_steps=max(1, checkpoint_every))
    try:
        return _train(task, stage_dir, ckpt, checkpoint_every=checkpoint_every, log_every=log_every, feed=feed)
    except BaseException:
        # Orbax's threads must not outlive a failed stage (at exit they print tracebacks over the one-line error);
        # the error that stopped the stage is the one reported.
        with contextlib.suppress(Exception):
            ckpt.close()
        raise


def _train(task: Task, stage_dir: str, ckpt: Checkpointer, *, checkpoint_every: int, log_every: int,
           feed: InputFeed) -> LoopResult:
    is_process0 = jax.process_index() == 0
    state, step, wall_before, wait_before = task.init_state, 0, 0.0, 0.0
    try:
        restored = ckpt.restore_latest(task.init_state)
    except CheckpointRestoreError as e:
        raise CheckpointRestoreError(_unreadable_checkpoints(task, stage_dir, e)) from e
    if restored is not None:
        step, state, meta = restored
        wall_before = float(meta.get("wall_time_s", 0.0))
        wait_before = float(meta.get("input_wait_s", 0.0))
        check_resume(task, meta)
        task.on_restore(meta)
        logging.info("[%s] resumed from step %d", task.name, step)
    t0, waited = time.time(), 0.0
    stopped_early = False
    with MetricWriter(stage_dir, is_process0=is_process0, stage=task.name) as writer, \
            PreemptionGuard(ckpt) as guard, \
            Progress(task.total_steps, step, task.name, disable=not is_process0) as bar, \
            prefetched(task.batch, step, task.total_steps, workers=feed.workers, depth=feed.prefetch) as batches:
        while step < task.total_steps:
            try:
                task.before_step(step)
            except StopStage as stop:
                logging.warning("[%s] stopping at step %d: %s", task.name, step, stop)
                stopped_early = True
                break
            asked = time.perf_counter()
            batch = next(batches)
            waited += time.perf_counter() - asked
            state, metrics = task.step(state, batch, step)
            step += 1
            extra = task.after_step(step)
            if step % log_every == 0 or step == task.total_steps:
                wait_scalar = {} if task.private else {"input_wait_fraction": waited / max(time.time() - t0, 1e-9)}
                writer.write_scalars(step, {**jax.device_get(metrics), **extra, **wait_scalar})
            bar.update()
            bar.set_postfix(**task.postfix())
            preempted = guard.should_stop(step)
            if step % checkpoint_every == 0 or preempted:
                ckpt.save(step, state, meta=_meta(task, wall_before + time.time() - t0, wait_before + waited),
                          force=preempted)
            if preempted:
                ckpt.close()
                logging.warning("[%s] preempted: saved step %d; rerun the same command to resume.",
                                task.name, step)
                return LoopResult(state, step, False, None)
    wall, wait = wall_before + time.time() - t0, wait_before + waited
    ckpt.save(step, state, meta=_meta(task, wall, wait), final=True)
    ckpt.close()
    timing = {"wall_time_s": round(wall, 3), "input_wait_s": round(wait, 3),
              "input_wait_fraction": round(wait / max(wall, 1e-9), 4)}
    if task.private:
        write_json_atomic(os.path.join(stage_dir, PRIVATE_TIMING), {"stage": task.name, **timing})
        timing = {}
    else:
        logging.info("[%s] input wait: %.1f%% of %.1f s", task.name, 100 * timing["input_wait_fraction"], wall)
    summary = write_summary(stage_dir, task.inputs, {
        "stage": task.name, "final_step": step, **timing, "params_sha256": hashing.params_sha256(task.params_of(state)),
        "stopped_early": stopped_early, **task.summary_extra()})
    return LoopResult(state, step, True, summary)


def _meta(task: Task, wall_time: float, input_wait: float) -> dict:
    inputs = {} if task.inputs is None else {"inputs": task.inputs}
    return {"stage": task.name, "wall_time_s": wall_time, "input_wait_s": input_wait, **inputs, **task.meta()}

