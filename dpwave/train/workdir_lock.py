"""One run per workdir: `hold(workdir)` locks `<workdir>/.lock` while a run writes there.

A second process started on a held workdir (a requeued job beside a manual rerun) is refused at once with
`WorkdirLockedError`, one line naming the holder (host, pid, start time, command); it does not wait.

* **Local and shared file systems**: an exclusive `flock` on the lock file, held until the run ends. The kernel
  drops it when the holder dies however it dies (SIGKILL, OOM), so a killed run's lock is taken over by the next
  run with no stale-lock cleanup; the file itself stays, empty, or naming the last holder if it was killed. On
  NFS, Linux emulates `flock` with POSIX byte-range locks, which every client sees (NFSv4, or NFSv3 with lockd);
  a client that crashes keeps its locks until the server's lease expires (about 90 s on NFSv4), so a rerun
  right after a node failure may be refused for that long. A file system without locks (NFS mounted `nolock`,
  Lustre without `-o flock`) makes `flock` fail: the run then goes on unlocked, with a warning.
* **Object stores** (`gs://`, `s3://`): no lock (an object store has no lock that its holder's death releases);
  the run warns that nothing stops a second run on the same workdir. Don't start two.
* **Multi-host**: process 0 takes the lock, on behalf of the whole run, and tells every other process whether
  it got it; when it did not, every process stops.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from dpwave import files

LOCK = ".lock"
_HELD = (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK)


class WorkdirLockedError(RuntimeError):
    """Another process holds the workdir's lock."""


def _holder() -> dict:
    """Who this process is: what a refused run shows of the holder."""
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)}


def _refusal(workdir: str, path: str) -> str:
    try:
        with open(path) as f:
            who = json.load(f)
        by = f"pid {who['pid']} on {who['host']}, started {who['started']} ({who['command']})"
    except (OSError, ValueError, KeyError, TypeError):
        by = "a process that has not recorded itself yet"
    return (f"workdir {workdir} is in use by another run: {by}; one run per workdir: wait for it to end, or stop it, "
            "then rerun the same command (it resumes), or use another --workdir")


@contextlib.contextmanager
def _flock(workdir: str) -> Iterator[bool]:
    """Holds the lock of a local or mounted `workdir` (created if missing); yields whether another process holds
    it (busy: then this one holds nothing)."""
    files.makedirs(workdir)
    path = os.path.join(workdir, LOCK)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in _HELD:
                yield True
                return
            logging.warning("cannot lock %s (%s): this file system has no file locks, so nothing stops a second run "
                            "on this workdir; don't start one", path, e)
            yield False
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_holder()) + "\n").encode(), 0)
        try:
            yield False
        finally:
            os.ftruncate(fd, 0)  # released: nobody to name
    finally:
        os.close(fd)  # drops the lock


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
    """Holds `workdir` for this run while the block runs (see the module docstring).

    Raises:
      WorkdirLockedError: another process holds it; the message names the holder and what to do.
    """
    if not files.is_local(workdir):
        if jax.process_index() == 0:
            logging.warning("workdir %s is on an object store, which dpwave cannot lock: nothing stops a second run "
                            "on it; don't start one", workdir)
        yield
        return
    if jax.process_index() != 0:
        if _busy_everywhere(False):
            raise WorkdirLockedError(f"workdir {workdir} is in use by another run (process 0 of this run names it)")
        yield
        return
    with _flock(workdir) as busy:
        if _busy_everywhere(busy):
            raise WorkdirLockedError(_refusal(workdir, os.path.join(workdir, LOCK)))
        yield


def _busy_everywhere(busy: bool) -> bool:
    """Process 0's `busy` on every process (process 0 alone tries the lock)."""
    if jax.process_count() > 1:
        busy = bool(multihost_utils.broadcast_one_to_all(np.int32(busy)))
    return busy
