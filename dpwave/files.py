"""Every file a run reads or writes outside the Orbax checkpoints, on any `etils.epath` backend.

A workdir may be a local folder or a bucket (``gs://bucket/run``, ``s3://...``): every path here is an
``epath.Path``, so summaries, metrics, logs, samples and reports land where the checkpoints do.

* **Atomic**: a write serializes to bytes in memory, writes a uniquely named temporary sibling
  (``.<name>.tmp-<process>-<pid>-<random>``) and renames it over the target, so a crash leaves the previous
  file (or none), never a partial one. On an object store the rename is a server-side copy: the object
  appears whole.
* **Process 0**: in a multi-host run only process 0 writes; other processes return ``None`` without
  touching the file system unless a write passes ``all_processes=True``.
* **Non-finite floats**: JSON is strict (RFC 8259): inf, -inf and NaN are written as the strings
  ``"Infinity"``, ``"-Infinity"`` and ``"NaN"`` (``float()`` reads them back). `read_json` also reads
  files with bare ``NaN``/``Infinity`` tokens (Python's default, used by older ``metrics.jsonl`` files).
* **Owner-only** (``private=True``): on a local disk files are created 0600 and folders 0700; an object
  store has no file modes, and access to a bucket is its IAM policy.
* **Growing files** (`Appender`: ``metrics.jsonl``, ``log.txt``, TensorBoard events): appended in place
  on a local disk; an object store cannot append, so there the whole file is rewritten atomically at
  each flush.
* **Full disk**: a write that fails for lack of space (ENOSPC, EDQUOT) raises `DiskFullError` naming the path; the
  previous file is intact (atomic writes), and a growing file is cut back to its last whole record.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import time
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np
from etils import epath

__all__ = ["Appender", "DiskFullError", "as_path", "dumps_json", "exists", "is_disk_full", "is_local", "is_process0",
           "makedirs", "read_bytes", "read_json", "read_npz", "read_text", "strict_json", "write_bytes", "write_json",
           "write_npz", "write_text"]

PathLike = str | os.PathLike[str]
_MISSING = object()
_FULL = (errno.ENOSPC, errno.EDQUOT)
# How TensorStore (Orbax's array writer) reports them: its errors are ValueErrors that quote the OS error.
_FULL_TEXT = tuple(f"os_error_code='{code}'" for code in _FULL) + tuple(os.strerror(code) for code in _FULL)


class DiskFullError(OSError):
    """A write failed for lack of space or quota; what was written before it is intact."""

    def __init__(self, path: PathLike, cause: BaseException) -> None:
        reason = cause.strerror if isinstance(cause, OSError) and cause.strerror else os.strerror(errno.ENOSPC)
        super().__init__(errno.ENOSPC, f"{reason} writing {path}; what was written before is intact: free space "
                                       "(or move the workdir) and rerun the same command to resume", os.fspath(path))

    def __str__(self) -> str:
        return self.strerror


def is_disk_full(error: BaseException) -> bool:
    """True for an OSError with ENOSPC or EDQUOT, or an error (Orbax, TensorStore) whose message quotes one."""
    if isinstance(error, OSError) and error.errno in _FULL:
        return True
    return any(text in str(error) for text in _FULL_TEXT)


def as_path(path: PathLike) -> epath.Path:
    """``path`` as an ``epath.Path`` (local paths and ``gs://``, ``s3://`` URIs alike)."""
    return epath.Path(path)


def is_local(path: PathLike) -> bool:
    """True for a path on the local file system (no ``scheme://`` prefix)."""
    return "://" not in os.fspath(path)


def is_process0() -> bool:
    """True on process 0 of a (multi-host) JAX run, and in a single-process run."""
    import jax  # Imported here: reading files needs no JAX.

    return jax.process_index() == 0


def exists(path: PathLike) -> bool:
    return as_path(path).exists()


def makedirs(path: PathLike, *, private: bool = False) -> epath.Path:
    """Creates folder ``path`` and its parents if needed; ``private`` makes a local one owner-only (0700)."""
    path = as_path(path)
    if private and is_local(path):
        os.makedirs(path, mode=0o700, exist_ok=True)
        os.chmod(path, 0o700)
    else:
        path.mkdir(parents=True, exist_ok=True)
    return path


def _temporary(path: epath.Path) -> epath.Path:
    import jax

    return path.parent / f".{path.name}.tmp-{jax.process_index()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def write_bytes(path: PathLike, data: bytes, *, private: bool = False,
                all_processes: bool = False) -> epath.Path | None:
    """Writes ``data`` to ``path`` atomically (see the module docstring); None off process 0. Raises
    `DiskFullError` when the file system is full (``path`` unchanged)."""
    if not (all_processes or is_process0()):
        return None
    path = as_path(path)
    makedirs(path.parent)
    tmp = _temporary(path)
    try:
        if is_local(path):
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o666)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        else:
            with tmp.open("wb") as f:
                f.write(data)
        tmp.replace(path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if is_disk_full(e) and not isinstance(e, DiskFullError):
            raise DiskFullError(path, e) from e
        raise
    return path


def write_text(path: PathLike, text: str, **kwargs: Any) -> epath.Path | None:
    """`write_bytes` of UTF-8 ``text``."""
    return write_bytes(path, text.encode("utf-8"), **kwargs)


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by "Infinity", "-Infinity" or "NaN" (strict JSON)."""
    if isinstance(value, (float, np.floating)):
        if math.isfinite(value):
            return float(value)
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, Mapping):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def dumps_json(data: Any, *, indent: int | None = None, sort_keys: bool = False) -> str:
    """Strict JSON text of ``data`` (non-finite floats as strings, see `strict_json`)."""
    return json.dumps(strict_json(data), indent=indent, sort_keys=sort_keys, allow_nan=False)


def write_json(path: PathLike, data: Any, *, indent: int = 2, sort_keys: bool = True,
               **kwargs: Any) -> epath.Path | None:
    """Writes ``data`` as strict JSON (see `dumps_json`), atomically, on process 0."""
    return write_text(path, dumps_json(data, indent=indent, sort_keys=sort_keys) + "\n", **kwargs)


def write_npz(path: PathLike, arrays: Mapping[str, np.ndarray], *, compressed: bool = False,
              **kwargs: Any) -> epath.Path | None:
    """Writes named arrays as one .npz file, atomically, on process 0."""
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
    return write_bytes(path, buffer.getvalue(), **kwargs)


def read_bytes(path: PathLike) -> bytes:
    return as_path(path).read_bytes()


def read_text(path: PathLike) -> str:
    return as_path(path).read_text(encoding="utf-8")


def read_json(path: PathLike, default: Any = _MISSING) -> Any:
    """The JSON value in ``path``; ``default`` (when given) if the file does not exist."""
    try:
        text = read_text(path)
    except FileNotFoundError:
        if default is _MISSING:
            raise
        return default
    return json.loads(text)


def read_npz(path: PathLike) -> dict[str, np.ndarray]:
    """Every array of an .npz file (pickles refused)."""
    with np.load(io.BytesIO(read_bytes(path)), allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


class Appender:
    """A file that only grows (log lines, JSONL records, event records), for one writer at a time; ``private``
    makes it owner-only (0600, also when it exists already).

    Local disk: opened for append, and every `write` reaches the file at once (a reader sees whole
    records); a write the disk has no room for is cut back off the file (`DiskFullError`). Object store: the
    existing content is read once, writes are buffered, and `flush` (called by `write` at most every
    ``flush_every_s`` seconds, and by `close`) rewrites the whole file atomically.
    """

    def __init__(self, path: PathLike, *, binary: bool = False, flush_every_s: float = 30.0,
                 private: bool = False) -> None:
        self.path = as_path(path)
        self._binary = binary
        self._flush_every_s = flush_every_s
        self._private = private
        self._local = is_local(self.path)
        makedirs(self.path.parent)
        if self._local:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600 if private else 0o666)
            if private:
                os.fchmod(self._fd, 0o600)  # a file an older run left group- or world-readable
        else:
            self._content = bytearray(self.path.read_bytes() if self.path.exists() else b"")
            self._dirty = False
            self._flushed_at = time.monotonic()
        self.closed = False

    def write(self, data: str | bytes) -> None:
        raw = data if self._binary else data.encode("utf-8")
        if self._local:
            self._append(raw)
            return
        self._content += raw
        self._dirty = True
        if time.monotonic() - self._flushed_at >= self._flush_every_s:
            self.flush()

    def _append(self, raw: bytes) -> None:
        size = os.fstat(self._fd).st_size
        try:
            view = memoryview(raw)
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as e:
            os.ftruncate(self._fd, size)  # no half record
            if is_disk_full(e):
                raise DiskFullError(self.path, e) from e
            raise

    def flush(self) -> None:
        if not self._local and self._dirty:
            write_bytes(self.path, bytes(self._content), private=self._private, all_processes=True)
            self._dirty = False
            self._flushed_at = time.monotonic()

    def close(self) -> None:
        if self.closed:
            return
        self.flush()
        if self._local:
            os.close(self._fd)
        self.closed = True

    def __enter__(self) -> Appender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
