"""Checkpointing facade over Orbax `CheckpointManager` + `ocp.args`.

Layout of one step directory (Orbax's, item names ours):

    <directory>/<step>/state/   the train-state pytree (`StandardSave`: params, optimizer state, EMA,
                                step, PRNG keys stored as `jax.random.key_data`)
    <directory>/<step>/meta/    a JSON dict (`JsonSave`): accountant ledger, sampler state, config
                                fingerprint, stage name, ...
    <directory>/final_steps.json  steps marked final: never garbage collected

Atomicity (verified for Orbax 0.12.8 on a local file system): a save writes into
`<step>.orbax-checkpoint-tmp` and renames it to `<step>` only once every item is committed, so a
crash leaves no directory that looks like a checkpoint; leftover tmp directories are removed when
a `Checkpointer` opens the directory. Saves are asynchronous: `save` returns after the device
arrays have been copied to host (donating them afterwards is safe); `close` waits for the writes.

Restores always go against an abstract target (shape, dtype and sharding of each leaf), so optax
state types, typed PRNG keys and `NamedSharding`s survive, including onto a different number of
devices than the state was saved from. If the newest checkpoint cannot be restored (truncated or
missing files), older ones are tried in turn: a fallback is one warning line (the full errors go to the log
file) and sets the unreadable ones aside (renamed `unreadable-<step>-<time>`, which no restore lists), so that the
steps taken again are saved again; when none restores, `CheckpointRestoreError` names the newest one. A save
that finds the disk full raises `files.DiskFullError` (at that save or, asynchronous, at the next save or
`close`); the step being written stays a temporary directory that no restore reads, so the previous
checkpoints are intact.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import io
import json
import os
import signal
import threading
import time
import types
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp
from orbax.checkpoint.checkpoint_managers import save_decision_policy as sdp

from dpwave import files

__all__ = [
    "Checkpointer",
    "CheckpointRestoreError",
    "PreemptionGuard",
    "abstract_state",
]

_STATE, _META = "state", "meta"
_FINAL_FILE = "final_steps.json"


class CheckpointRestoreError(RuntimeError):
    """Checkpoints exist but none of them could be restored against the given target."""


def _first_line(error: BaseException, limit: int = 200) -> str:
    """`Type: message` of an error, cut to its first line and `limit` characters (Orbax errors run long)."""
    text = f"{type(error).__name__}: {str(error).strip()}".splitlines()[0]
    return text if len(text) <= limit else text[:limit - 3] + "..."


@contextlib.contextmanager
def _stray_prints_to_the_log(grace_s: float = 0.2) -> Iterator[None]:
    """Sends what is printed on sys.stderr meanwhile, and for `grace_s` after a failure, to the log file: TensorStore
    prints a traceback ("Event loop is closed") for each read of a damaged checkpoint that ends after Orbax gave up
    on it, which would land between the one-line messages of the fallback or the refusal."""
    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed):
            try:
                yield
            except Exception:
                time.sleep(grace_s)  # the reads still in flight end within milliseconds
                raise
    finally:
        if printed.getvalue():
            logging.info("printed while restoring a checkpoint:\n%s", printed.getvalue())


def _is_key(x: Any) -> bool:
    return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def _replicated_sharding() -> jax.sharding.NamedSharding:
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("replica",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def abstract_state(state: Any) -> Any:
    """Abstract restore target of a (concrete or abstract) state: a `jax.ShapeDtypeStruct` per array.

    Shardings of the input are kept; leaves without one (numpy arrays, `jax.eval_shape` output) get
    a sharding replicated over all devices. Typed PRNG keys keep their key dtype.
    Python scalars are kept as they are.
    """
    replicated = _replicated_sharding()

    def leaf(x: Any) -> Any:
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            return x
        sharding = getattr(x, "sharding", None) or replicated
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(leaf, state)


def _keys_to_data(tree: Any) -> Any:
    """Typed PRNG keys -> their uint32 key data (what Orbax can store)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _key_data_target(x: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
    # Key data appends trailing unsharded dims, so the key's NamedSharding applies unchanged.
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=x.sharding)


def _data_to_keys(restored: Any, target: Any) -> Any:
    """Re-wraps restored key data as typed keys wherever the target holds a key (same impl)."""
    return jax.tree.map(
        lambda r, t: jax.random.wrap_key_data(r, dtype=t.dtype) if _is_key(t) else r,
        restored, target)


@dataclasses.dataclass
class _LatestNAndMarked(pp.PreservationPolicy):
    """Keeps the newest `n` checkpoints plus every step in `marked` (shared, mutable)."""
    n: int
    marked: set[int]

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> Sequence[bool]:
        latest = pp.LatestN(n=self.n).should_preserve(checkpoints, context=context)
        return [keep or c.step in self.marked for keep, c in zip(latest, checkpoints)]


class Checkpointer:
    """Saves and restores `(step, state pytree, meta dict)` under one directory.

    Args:
      directory: local path or URL (gs://...) of the checkpoint root; created if missing.
      max_to_keep: number of newest checkpoints kept (older ones are deleted after each save).
      save_interval_steps: `save` without `force` writes only on multiples of this (and at the
        step all hosts agreed on after a preemption notice).
      keep_final: if True, steps saved with `final=True` are never garbage collected.
      async_save: write in a background thread (`close`/`wait_until_finished` wait for it).
    """

    def __init__(self, directory: str | os.PathLike[str], *, max_to_keep: int = 3,
                 save_interval_steps: int = 1, keep_final: bool = True,
                 async_save: bool = True) -> None:
        if not isinstance(max_to_keep, int) or max_to_keep < 1:
            raise ValueError(f"max_to_keep must be an int >= 1, got {max_to_keep!r}.")
        if not isinstance(save_interval_steps, int) or save_interval_steps < 1:
            raise ValueError(f"save_interval_steps must be an int >= 1, got {save_interval_steps!r}.")
        path = os.fspath(directory)
        self._directory = epath.Path(path if "://" in path else os.path.abspath(path))
        self._keep_final = keep_final
        self._final_steps: set[int] = self._read_final_steps() if keep_final else set()
        options = ocp.CheckpointManagerOptions(
            # Orbax's default also saves the first step it sees; we save on the interval only.
            save_decision_policy=sdp.AnySavePolicy([sdp.FixedIntervalPolicy(save_interval_steps),
                                                    sdp.PreemptionCheckpointingPolicy()]),
            preservation_policy=_LatestNAndMarked(max_to_keep, self._final_steps),
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self._directory, options=options,
                                              item_names=(_STATE, _META))

    @property
    def directory(self) -> epath.Path:
        return self._directory

    def all_steps(self) -> list[int]:
        """Steps with a committed checkpoint, ascending (after finished background saves)."""
        return sorted(self._manager.all_steps())

    @property
    def final_steps(self) -> frozenset[int]:
        return frozenset(self._final_steps)

    def should_save(self, step: int) -> bool:
        """True if `save(step, ...)` without `force` would write (interval reached, step is new)."""
        return self._manager.should_save(step)

    def reached_preemption(self, step: int) -> bool:
        """True at the step all hosts agreed to save at after a preemption notice (multi-host)."""
        return self._manager.reached_preemption(step)

    def save(self, step: int, state: Any, *, meta: Mapping[str, Any], force: bool = False,
             final: bool = False) -> bool:
        """Saves `state` (pytree) and `meta` (JSON dict) at `step`; returns whether it wrote.

        Without `force` it writes only when `should_save(step)`. `final=True` implies `force` and marks
        the step as never-deleted (with `keep_final`). Saving an existing step does nothing (a final
        save of an existing step only marks it).
        """
        if not isinstance(step, (int, np.integer)) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be a non-negative int, got {step!r}.")
        step = int(step)
        meta = _checked_meta(meta)
        if final and self._keep_final:
            self._mark_final(step)
        with self._disk_full_is_an_error():
            if step in self._manager.all_steps():
                logging.info("Checkpoint for step %d already exists in %s; not overwritten.", step,
                             self._directory)
                return False
            return self._manager.save(
                step,
                args=ocp.args.Composite(**{_STATE: ocp.args.StandardSave(_keys_to_data(state)),
                                           _META: ocp.args.JsonSave(meta)}),
                force=force or final)

    def restore(self, step: int, abstract: Any) -> tuple[Any, dict[str, Any]]:
        """Restores `(state, meta)` of `step` against `abstract` (see `abstract_state`)."""
        target = abstract_state(abstract)
        restore_target = jax.tree.map(lambda t: _key_data_target(t) if _is_key(t) else t, target)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(**{_STATE: ocp.args.StandardRestore(restore_target),
                                       _META: ocp.args.JsonRestore()}))
        return _data_to_keys(restored[_STATE], target), dict(restored[_META])

    def restore_latest(self, abstract: Any) -> tuple[int, Any, dict[str, Any]] | None:
        """`(step, state, meta)` of the newest restorable checkpoint, or None if there is none.

        A checkpoint that fails to restore is skipped and the next older one is tried; a fallback logs one
        warning line (each error in full goes to the log file at INFO). Raises `CheckpointRestoreError`, naming
        the newest checkpoint's directory, if checkpoints exist but none restores (never silently restarts: the
        privacy ledger lives in the checkpoint). Pending saves are waited for first.
        """
        self.wait_until_finished()
        self._manager.reload()
        steps = sorted(self._manager.all_steps(), reverse=True)
        failures: list[str] = []
        for step in steps:
            try:
                with _stray_prints_to_the_log():
                    state, meta = self.restore(step, abstract)
            except Exception as e:  # Orbax/TensorStore raise many types for damaged files.
                logging.info("Checkpoint step %d in %s could not be restored: %s: %s", step, self._directory,
                             type(e).__name__, e)
                failures.append(_first_line(e))
                continue
            if failures:
                gc.collect()  # the abandoned reads' asyncio tasks report now, into the log file, not at exit
                unreadable = ", ".join(map(str, steps[:len(failures)]))
                logging.warning("Checkpoint step%s %s in %s could not be restored (%s); resuming from step %d, the "
                                "newest readable one (set aside as unreadable-<step>-<time>; full errors in the log "
                                "file).", "s" * (len(failures) > 1), unreadable, self._directory, failures[0], step)
                self._set_aside(steps[:len(failures)])
            return step, state, meta
        if failures:
            gc.collect()
            raise CheckpointRestoreError(
                f"none of the checkpoints {steps} in {self._directory} could be restored (the newest, "
                f"{self._directory / str(steps[0])}: {failures[0]})")
        return None

    def _set_aside(self, steps: Sequence[int]) -> None:
        """Renames unreadable step directories out of Orbax's sight, so that those steps can be saved again."""
        if jax.process_index() == 0:
            stamp = time.strftime("%Y%m%dT%H%M%S")
            for step in steps:
                (self._directory / str(step)).rename(self._directory / f"unreadable-{step}-{stamp}")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("dpwave checkpoints set aside")
        self._manager.reload()

    def wait_until_finished(self) -> None:
        with self._disk_full_is_an_error():
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending asynchronous saves and deletions, then releases the manager."""
        with self._disk_full_is_an_error():
            self._manager.wait_until_finished()
            self._manager.close()

    @contextlib.contextmanager
    def _disk_full_is_an_error(self) -> Iterator[None]:
        """Orbax reports a full disk as a ValueError quoting the OS error; this makes it a `files.DiskFullError`."""
        try:
            yield
        except files.DiskFullError:
            raise
        except Exception as e:
            if files.is_disk_full(e):
                raise files.DiskFullError(self._directory, e) from e
            raise

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read_final_steps(self) -> set[int]:
        path = self._directory / _FINAL_FILE
        if not path.exists():
            return set()
        try:
            return {int(s) for s in json.loads(path.read_text())["final_steps"]}
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is damaged ({e}); fix or delete it (it lists the checkpoint "
                             "steps that must never be garbage collected).") from e

    def _mark_final(self, step: int) -> None:
        self._final_steps.add(step)
        if jax.process_index() != 0:
            return
        self._directory.mkdir(parents=True, exist_ok=True)
        files.write_json(self._directory / _FINAL_FILE, {"final_steps": sorted(self._final_steps)})


def _checked_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(meta, Mapping):
        raise ValueError(f"meta must be a dict of JSON values, got {type(meta).__name__}.")
    try:  # inf/nan (e.g. a non-private run's epsilon) round-trip as Python's json writes them.
        return json.loads(json.dumps(dict(meta)))
    except (TypeError, ValueError) as e:
        raise ValueError(f"meta is not JSON-serializable ({e}); convert arrays with .tolist() and "
                         "numpy scalars with float()/int().") from e


class PreemptionGuard:
    """Context that turns SIGTERM into a flag checked at step boundaries.

        with PreemptionGuard(ckpt) as guard:
          for step in range(start, total):
            state = train_step(state)
            if guard.should_stop(step):
              ckpt.save(step, state, meta=meta, force=True)
              break          # the process then exits 0; rerunning resumes

    Single process: a Python SIGTERM handler sets the flag. Multi-process (jax.process_count() > 1):
    no Python handler is installed; JAX's preemption service catches SIGTERM on any host and
    `Checkpointer.reached_preemption` turns True on every host at the same step, so all hosts save
    together (a host-local flag would make hosts disagree and hang the save).
    """

    def __init__(self, checkpointer: Checkpointer | None = None, *,
                 signals: Sequence[int] = (signal.SIGTERM,)) -> None:
        self._checkpointer = checkpointer
        self._signals = tuple(signals)
        self._previous: dict[int, Any] = {}
        self._requested = threading.Event()

    @property
    def requested(self) -> bool:
        """True once a handled signal arrived."""
        return self._requested.is_set()

    def should_stop(self, step: int) -> bool:
        """True if the loop should save at `step` and exit."""
        if self._requested.is_set():
            return True
        return self._checkpointer is not None and self._checkpointer.reached_preemption(step)

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        del frame
        logging.warning("Received signal %d: saving at the next step boundary, then exiting.", signum)
        self._requested.set()

    def __enter__(self) -> PreemptionGuard:
        if jax.process_count() > 1:
            logging.info("PreemptionGuard: multi-process run, relying on JAX's preemption service.")
        elif threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionGuard must be entered in the main thread (signal handlers "
                               "can only be installed there).")
        else:
            for sig in self._signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
