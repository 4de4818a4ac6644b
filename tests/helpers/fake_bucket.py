"""An in-memory stand-in for a ``gs://`` bucket behind ``etils.epath``, for offline tests.

`fake_bucket()` routes every ``gs://`` path to a fresh fsspec memory file system through epath's own fsspec
backend (the one real buckets use when TensorFlow is absent), so code under test runs its ordinary epath
calls. Like an object store, a file opened for writing becomes visible whole when it is closed (also when
the writer raised), renames are copies, and there are no file modes.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from unittest import mock

from etils.epath import backend, gpath
from fsspec.implementations.memory import MemoryFileSystem


class _MemoryFileSystem(MemoryFileSystem):
    cachable = False  # a fresh store per fake bucket, not fsspec's process-wide one

    def __init__(self) -> None:
        super().__init__()
        self.store = {}
        self.pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path):
        """'gs://bucket/a' -> 'bucket/a', as gcsfs does (epath adds 'gs://' back to listed paths)."""
        path = str(path)
        return (path[len("gs://"):] if path.startswith("gs://") else path).strip("/")


class MemoryBackend(backend._FileSystemSpecBackend):
    """epath's fsspec backend with an in-memory file system for every path."""

    def __init__(self) -> None:
        self.memory = _MemoryFileSystem()

    def fs(self, path):
        return self.memory


@contextlib.contextmanager
def fake_bucket() -> Iterator[MemoryBackend]:
    """Routes ``gs://`` paths to a new in-memory file system while the context is open."""
    fake = MemoryBackend()
    with mock.patch.dict(gpath._PREFIX_TO_BACKEND, {"gs": fake}), \
            mock.patch.object(gpath, "_is_tf_installed", lambda: False):
        yield fake
