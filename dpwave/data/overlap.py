"""The content side of the privacy boundary: no public role may hold an image of the private set.

Every example's decoded pixels, as the run reads them (its resolution and channels), are hashed with
BLAKE2b-128 over dtype, shape and bytes; a public example whose hash is a private one's is refused. Only
exact copies are caught: a re-encoded, re-cropped or resized copy of a private image has other pixels
and passes (near-duplicate detection is out of scope).

Hashes are cached per dataset fingerprint in ``<prepared dataset dir>/dpwave_hashes/<fingerprint>.npy``,
owner-only (0600, in a 0700 folder): hashes of private images derive from private data, so they stay
beside that data. The fingerprint covers the hash scheme, the spec fields that change the pixels (name,
split, resolution, channels, labels) and every data file's path, row range, size and mtime, so a rebuilt
dataset is hashed again. A dataset that is not a local prepared TFDS dataset is hashed on every call.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from collections.abc import Mapping
from concurrent import futures

import numpy as np
from absl import logging

from dpwave import files
from dpwave.data.errors import PrivateOverlapError
from dpwave.data.source import Source

HASH_SCHEME = "blake2b-128 of dtype, shape and bytes of the decoded pixels, v1"
CACHE_DIR = "dpwave_hashes"
DIGEST_SIZE = 16
_SHOWN = 5
_CHUNK = 4096


@dataclasses.dataclass(frozen=True)
class PixelHashes:
    """The digests of a source's images, in order, and where they came from."""

    digests: np.ndarray  # (N,) bytes of DIGEST_SIZE
    cache_path: str | None  # None: not cacheable (not a local prepared TFDS dataset)
    hashed: int  # images hashed by this call; 0 when read from the cache


def image_digest(image: np.ndarray) -> bytes:
    """BLAKE2b-128 of an image's dtype, shape and pixel bytes."""
    image = np.ascontiguousarray(image)
    digest = hashlib.blake2b(f"{image.dtype.str}{image.shape}".encode(), digest_size=DIGEST_SIZE)
    digest.update(image.data)
    return digest.digest()


def dataset_fingerprint(source: Source) -> str | None:
    """SHA-256 of the hash scheme, the pixel-relevant spec fields and the data files' identity; None
    when the source reads no local files."""
    data_files = source.data_files
    if not data_files or any("://" in path for path, _, _ in data_files):
        return None
    try:
        stats = [os.stat(path) for path, _, _ in data_files]
    except OSError:
        return None
    identity = [[path, skip, take, st.st_size, st.st_mtime_ns]
                for (path, skip, take), st in zip(data_files, stats)]
    spec = source.spec
    record = {"scheme": HASH_SCHEME, "name": spec.name, "split": spec.split, "resolution": spec.resolution,
              "channels": spec.channels, "labels": None if spec.labels is None else list(spec.labels),
              "examples": len(source), "files": identity}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def cache_path(source: Source) -> str | None:
    """Where ``source``'s hashes are cached, or None when it cannot be."""
    fingerprint = dataset_fingerprint(source)
    if fingerprint is None:
        return None
    return os.path.join(os.path.dirname(source.data_files[0][0]), CACHE_DIR, f"{fingerprint}.npy")


def _read_cache(path: str, size: int) -> np.ndarray | None:
    try:
        table = np.load(io.BytesIO(files.read_bytes(path)), allow_pickle=False)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        logging.warning("unreadable pixel-hash cache %s (%s); hashing again", path, e)
        return None
    if table.dtype != np.uint8 or table.shape != (size, DIGEST_SIZE):
        logging.warning("pixel-hash cache %s holds %s %s, expected (%d, %d) uint8; hashing again", path,
                        table.shape, table.dtype, size, DIGEST_SIZE)
        return None
    return table.view(f"S{DIGEST_SIZE}").ravel()


def _write_cache(path: str, digests: np.ndarray) -> None:
    """Owner-only, atomic (`dpwave.files`); every process caches beside its own copy of the data; a failure
    only costs a re-hash."""
    buffer = io.BytesIO()
    np.save(buffer, digests.view(np.uint8).reshape(-1, DIGEST_SIZE))
    try:
        files.makedirs(os.path.dirname(path), private=True)
        files.write_bytes(path, buffer.getvalue(), private=True, all_processes=True)
    except OSError as e:
        logging.warning("could not cache pixel hashes at %s (%s); the next run hashes again", path, e)


def pixel_hashes(source: Source) -> PixelHashes:
    """The digest of every image of ``source``, from the cache when its fingerprint matches."""
    path = cache_path(source)
    if path is not None and (cached := _read_cache(path, len(source))) is not None:
        return PixelHashes(cached, path, 0)
    digests = np.empty(len(source), f"S{DIGEST_SIZE}")
    # Decoding dominates and releases the GIL (PIL, array_record's thread-safe readers, hashlib).
    with futures.ThreadPoolExecutor(min(32, os.cpu_count() or 1)) as pool:
        for start in range(0, len(source), _CHUNK):
            index = range(start, min(start + _CHUNK, len(source)))
            digests[start:index.stop] = list(pool.map(lambda i: image_digest(source[i]["image"]), index))
    if path is not None:
        _write_cache(path, digests)
    return PixelHashes(digests, path, len(digests))


def _example_id(source: Source, index: int) -> str:
    return str(source[index].get("id", f"#{index}"))


def check_disjoint(private: Source, public: Mapping[str, Source]) -> dict[str, PixelHashes]:
    """Refuses public sources that hold an image identical to one of ``private``.

    Args:
      private: the DP training set.
      public: the sources read without DP, by role (``config.data.public``, ``config.data.heldout``, ...).

    Returns:
      Every source's hashes, ``"private"`` first, then by role.

    Raises:
      PrivateOverlapError: one line naming each offending role, its count of private images and a few
        (public id = private id) pairs.
    """
    hashes = {"private": pixel_hashes(private)}
    hashes.update({role: pixel_hashes(source) for role, source in public.items()})
    private_digests = hashes["private"].digests
    problems = []
    for role, source in public.items():
        digests = hashes[role].digests
        hits = np.flatnonzero(np.isin(digests, private_digests))
        if hits.size:
            pairs = [f"{_example_id(source, int(i))!r} = private "
                     f"{_example_id(private, int(np.flatnonzero(private_digests == digests[i])[0]))!r}"
                     for i in hits[:_SHOWN]]
            problems.append(f"{role} ({source.spec.label}) holds {hits.size} of {len(source)} images identical to "
                            f"private ones (e.g. {', '.join(pairs)})")
    if problems:
        raise PrivateOverlapError(
            f"private images in roles read without DP, against {private.spec.label} ({len(private)} images): "
            f"{'; '.join(problems)}; remove them from those datasets or use disjoint splits")
    logging.info("privacy boundary: no image of %s (%d) in %s", private.spec.label, len(private),
                 ", ".join(f"{role} ({len(s)})" for role, s in public.items()))
    return hashes
