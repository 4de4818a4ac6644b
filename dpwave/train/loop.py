"""The machinery of a stage's step loop (`StageLoop`): restore, prefetch, log, checkpoint, preempt, summarize.

A stage writes its own loop and calls this machinery from it:

    with loop.StageLoop(name, stage_dir, options, inputs=..., private=...) as stage_loop:
        state, start = stage_loop.restore(init_state, on_restore)
        for i, batch in stage_loop.batches(make_batch, total_steps):
            state, metrics = step(state, batch, i)
            if stage_loop.end_step(i + 1, state, metrics, meta=meta):  # log, checkpoint; True: preempted
                return stage_loop.result
        return stage_loop.finish(state, params)

`run(task, ...)` is that loop for a `Task` (the public stages, the generator, the DP-MERF release); the DP-SGD
stages write it out (`stages/dp_finetune.py`). A batch and a step's randomness are functions of (seed, step index)
only, and the JSON `meta` (sampler state, privacy ledger) is saved beside the state together with the stage's
`inputs` (the settings it reads and the fingerprints of the stages it consumes). Because of that, a run killed at
any step and rerun restores the newest checkpoint and continues bit-identically, and a rerun under other inputs
is refused (`fingerprints.StaleStageError`) instead of continuing a different computation.

Faults: a damaged newest checkpoint falls back to an older one (one warning line); when none restores the stage
stops with `CheckpointRestoreError` naming the folder and the fix, and never starts over by itself (the DP stage's
privacy ledger lives in its checkpoints). A full disk stops it with `files.DiskFullError`; the checkpoints and
summaries written before are intact and the same command resumes once there is room.

Batches are made on input worker threads a few steps ahead (`dpwave.data.prefetch`); the time the loop waits for
the next batch, over the stage's wall time, is its input-wait fraction (metrics, summary and log of a public stage;
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
    """Raised by a stage's check before a step (`Task.before_step`, the DP stages' budget check) to end it early and
    cleanly: the loop calls `StageLoop.stop_early` and finishes."""


@dataclasses.dataclass
class Task:
    """What `run` trains (the public stages). `batch(i)` is step i's input (host arrays; a pure function of i,
    thread-safe: it runs on input workers ahead of the step) and `step(state, batch, i)` consumes it.
    `params_of(state)` picks the parameters hashed in the summary.

    A `private` stage reads private data: its directory and every file it writes are owner-only, and its
    wall time and input wait (which depend on its private draws) go to the owner-only PRIVATE_TIMING, not the
    summary, the metrics or the log.
    `inputs` (JSON, `fingerprints`) go into every checkpoint and the summary; a checkpoint written under other
    inputs is refused, except in the paths of `reconciled_on_resume`, which `on_restore` checks itself.
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
    summary_extra: Callable[[], dict] = dict
    private: bool = False
    inputs: Mapping[str, Any] | None = None
    reconciled_on_resume: tuple[str, ...] = ()


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


def check_resume(name: str, inputs: Mapping[str, Any] | None, reconciled_on_resume: tuple[str, ...],
                 meta: Mapping[str, Any]) -> None:
    """Refuses a checkpoint whose recorded inputs differ from `inputs` outside `reconciled_on_resume` (a checkpoint
    without recorded inputs, written by an older dpwave, is only warned about)."""
    if inputs is None:
        return
    if "inputs" not in meta:
        logging.warning("[%s] the checkpoint records no inputs (written by an older dpwave); it cannot be checked "
                        "against this config and is resumed as is", name)
        return
    recorded = fingerprints.without(meta["inputs"], reconciled_on_resume)
    current = fingerprints.without(inputs, reconciled_on_resume)
    if recorded != current:
        raise fingerprints.StaleStageError(
            f"stage {name!r} was checkpointed under other inputs than this config gives (changed: "
            f"{', '.join(fingerprints.changed(recorded, current))}); an unfinished stage never resumes under changed "
            "inputs: restore the original values, or rerun with a new --workdir")


def _unreadable_checkpoints(name: str, private: bool, stage_dir: str, error: CheckpointRestoreError) -> str:
    """The one-line message of a stage none of whose checkpoints restores: the folder, and the two ways on."""
    over = (" (for the DP stage that starts a new privacy ledger that does not count the steps already taken on the "
            "private data: the run's privacy cost is then the new ledger's plus whatever the lost run released)"
            if private else "")
    return (f"stage {name!r}: {error}; restore that folder from a copy and rerun the same command, or delete "
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


@dataclasses.dataclass(frozen=True)
class LoopOptions:
    """How often a stage logs and checkpoints, how many checkpoints it keeps, and how its input is made."""

    checkpoint_every: int
    max_to_keep: int
    log_every: int
    feed: InputFeed = InputFeed()


class StageLoop:
    """Resume, prefetch, metrics, progress, checkpoint cadence, preemption and the summary of one stage's loop in
    `stage_dir` (see the module docstring for the loop that calls it).

    A `private` stage reads private data: its directory and every file it writes are owner-only, and its wall time
    and input wait (which depend on its private draws) go to the owner-only PRIVATE_TIMING, not the summary, the
    metrics or the log. `inputs` (JSON, `fingerprints`) go into every checkpoint and the summary; a checkpoint
    written under other inputs is refused, except in the paths of `reconciled_on_resume`, which the stage checks
    itself on restore.
    """

    def __init__(self, name: str, stage_dir: str, options: LoopOptions, *, inputs: Mapping[str, Any] | None = None,
                 reconciled_on_resume: tuple[str, ...] = (), private: bool = False):
        self.name, self.stage_dir, self.options = name, stage_dir, options
        self.inputs, self.reconciled_on_resume, self.private = inputs, reconciled_on_resume, private
        self.result: LoopResult | None = None  # set when the loop ends (finished, stopped early or preempted)
        self._outer = contextlib.ExitStack()  # umask, disk-full errors, the checkpointer
        self._inner = contextlib.ExitStack()  # what runs with the steps: metrics, preemption, progress, batches
        self._wall_before = self._wait_before = self._waited = 0.0
        self._stopped_early = False

    def __enter__(self) -> StageLoop:
        if self.private:
            private_dir(self.stage_dir)
        self._outer.enter_context(_owner_only_files(self.private))
        self._outer.enter_context(_disk_full_is_one_error(self.stage_dir))
        self.ckpt = Checkpointer(os.path.join(self.stage_dir, "checkpoints"), max_to_keep=self.options.max_to_keep,
                                 save_interval_steps=max(1, self.options.checkpoint_every))
        self._outer.push(self._close_on_error)
        self._outer.enter_context(self._inner)
        return self

    def __exit__(self, *exc: Any) -> bool:
        return self._outer.__exit__(*exc)

    def _close_on_error(self, exc_type: Any, *_: Any) -> None:
        """Orbax's threads must not outlive a failed stage (at exit they print tracebacks over the one-line error);
        the error that stopped the stage is the one reported."""
        if exc_type is not None:
            with contextlib.suppress(Exception):
                self.ckpt.close()

    def restore(self, init_state: Any, on_restore: Callable[[dict], None] = lambda meta: None) -> tuple[Any, int]:
        """(state, step) to start from: the newest checkpoint's, checked against the inputs and then by
        `on_restore(meta)`, or (`init_state`, 0). Opens the metrics, the preemption guard and the progress bar."""
        state, step = init_state, 0
        try:
            restored = self.ckpt.restore_latest(init_state)
        except CheckpointRestoreError as e:
            raise CheckpointRestoreError(_unreadable_checkpoints(self.name, self.private, self.stage_dir, e)) from e
        if restored is not None:
            step, state, meta = restored
            self._wall_before = float(meta.get("wall_time_s", 0.0))
            self._wait_before = float(meta.get("input_wait_s", 0.0))
            check_resume(self.name, self.inputs, self.reconciled_on_resume, meta)
            on_restore(meta)
            logging.info("[%s] resumed from step %d", self.name, step)
        self._t0, self._is_process0 = time.time(), jax.process_index() == 0
        self.writer = self._inner.enter_context(MetricWriter(self.stage_dir, is_process0=self._is_process0,
                                                             stage=self.name))
        self.guard = self._inner.enter_context(PreemptionGuard(self.ckpt))
        self._start = step
        return state, step

    def batches(self, make_batch: Callable[[int], Any], total_steps: int) -> Iterator[tuple[int, Any]]:
        """(i, make_batch(i)) for the steps from the restored one to `total_steps`, made ahead on the input workers;
        the time spent waiting for each is the input wait."""
        self.total_steps, feed = total_steps, self.options.feed
        self.bar = self._inner.enter_context(Progress(total_steps, self._start, self.name,
                                                      disable=not self._is_process0))
        made = self._inner.enter_context(prefetched(make_batch, self._start, total_steps, workers=feed.workers,
                                                    depth=feed.prefetch))
        for i in range(self._start, total_steps):
            asked = time.perf_counter()
            batch = next(made)
            self._waited += time.perf_counter() - asked
            yield i, batch

    def logs(self, step: int) -> bool:
        """Whether `end_step(step, ...)` writes a metrics line."""
        return step % self.options.log_every == 0 or step == self.total_steps

    def end_step(self, step: int, state: Any, metrics: Mapping[str, Any], *, meta: Callable[[], dict] = dict,
                 extra: Mapping[str, Any] | None = None, postfix: Mapping[str, Any] | None = None) -> bool:
        """After `step` steps: writes `metrics` and `extra` on the log steps, advances the progress bar (`postfix`
        beside it), checkpoints `state` with `meta()` at the cadence, and on SIGTERM saves, closes and returns True
        (`result` then holds the unfinished result: the caller returns it and a rerun resumes)."""
        if self.logs(step):
            wait = {} if self.private else {"input_wait_fraction": self._waited / max(time.time() - self._t0, 1e-9)}
            self.writer.write_scalars(step, {**jax.device_get(metrics), **(extra or {}), **wait})
        self.bar.update()
        self.bar.set_postfix(**(postfix or {}))
        preempted = self.guard.should_stop(step)
        if step % self.options.checkpoint_every == 0 or preempted:
            self.ckpt.save(step, state, meta=self._meta(meta()), force=preempted)
        if preempted:
            self._inner.close()
            self.ckpt.close()
            logging.warning("[%s] preempted: saved step %d; rerun the same command to resume.", self.name, step)
            self.result = LoopResult(state, step, False, None)
        return preempted

    def stop_early(self, step: int, reason: str) -> None:
        """Ends the loop before `total_steps` (e.g. the privacy budget): `finish` then records it."""
        logging.warning("[%s] stopping at step %d: %s", self.name, step, reason)
        self._stopped_early = True

    def finish(self, state: Any, step: int, params: Any, *, meta: Callable[[], dict] = dict,
               summary_extra: Mapping[str, Any] | None = None) -> LoopResult:
        """The final checkpoint (with `meta()`), the timing and `summary.json` (final step, wall time and input-wait
        fraction unless private, `params_sha256` of `params`, `summary_extra`, the inputs)."""
        self._inner.close()
        wall, wait = self._wall_before + time.time() - self._t0, self._wait_before + self._waited
        self.ckpt.save(step, state, meta=self._meta(meta(), wall, wait), final=True)
        self.ckpt.close()
        timing = {"wall_time_s": round(wall, 3), "input_wait_s": round(wait, 3),
                  "input_wait_fraction": round(wait / max(wall, 1e-9), 4)}
        if self.private:
            write_json_atomic(os.path.join(self.stage_dir, PRIVATE_TIMING), {"stage": self.name, **timing})
            timing = {}
        else:
            logging.info("[%s] input wait: %.1f%% of %.1f s", self.name, 100 * timing["input_wait_fraction"], wall)
        summary = write_summary(self.stage_dir, self.inputs, {
            "stage": self.name, "final_step": step, **timing, "params_sha256": hashing.params_sha256(params),
            "stopped_early": self._stopped_early, **(summary_extra or {})})
        self.result = LoopResult(state, step, True, summary)
        return self.result

    def _meta(self, meta: dict, wall_time: float | None = None, input_wait: float | None = None) -> dict:
        wall = self._wall_before + time.time() - self._t0 if wall_time is None else wall_time
        wait = self._wait_before + self._waited if input_wait is None else input_wait
        inputs = {} if self.inputs is None else {"inputs": self.inputs}
        return {"stage": self.name, "wall_time_s": wall, "input_wait_s": wait, **inputs, **meta}


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


def run(task: Task, stage_dir: str, *, checkpoint_every: int, max_to_keep: int, log_every: int,
        feed: InputFeed = InputFeed()) -> LoopResult:
    """Runs `task` in `stage_dir` from its newest checkpoint to `task.total_steps`: the loop of the module docstring
    with the task's hooks (`before_step` may stop it with `StopStage`)."""
    options = LoopOptions(checkpoint_every, max_to_keep, log_every, feed)
    with StageLoop(task.name, stage_dir, options, inputs=task.inputs, reconciled_on_resume=task.reconciled_on_resume,
                   private=task.private) as stage_loop:
        state, step = stage_loop.restore(task.init_state, task.on_restore)
        for i, batch in stage_loop.batches(task.batch, task.total_steps):
            try:
                task.before_step(i)
            except StopStage as stop:
                stage_loop.stop_early(i, str(stop))
                break
            state, metrics = task.step(state, batch, i)
            step = i + 1
            if stage_loop.end_step(step, state, metrics, meta=task.meta):
                return stage_loop.result
        return stage_loop.finish(state, step, task.params_of(state), meta=task.meta, summary_extra=task.summary_extra())
