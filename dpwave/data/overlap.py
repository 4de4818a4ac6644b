"""The content side of the privacy boundary: no public role may hold an image of the private set, nor a near copy.

**Exact copies.** Every example's decoded pixels, as the run reads them (its resolution and channels), are hashed
with BLAKE2b-128 over dtype, shape and bytes; a public example whose hash is a private one's is refused.

**Near copies** (`dpwave.data.near_duplicates`). Each image also gets a 256-float descriptor (16x16 cell means of
its luma inside a 2 px border, mean removed, unit norm; 9 per private image: shifts of -1..1 px), and a public
image whose similarity to a private one (the cosine of their descriptors without the most different 2x2 block of
cells, best over the shifts) is at least ``threshold`` (default `DEFAULT_THRESHOLD`, 0.998) is refused. That
catches a private image with one pixel changed, its brightness moved, re-encoded as JPEG (quality 95; at 64 px
and more) or shifted by one pixel; on mnist5k no public, heldout or test digit reaches 0.995 against a private
one. A crop, a resize, a flip or a heavier edit is not caught, and captions are not compared. The index is exact
(every pair at or above the threshold is found) and blockwise in numpy.

A refusal is one ``PrivateOverlapError`` line: the role, its count and a few (public id ~ private id,
similarity) pairs. With ``report_dir``, the closest pairs at or above `REPORT_FLOOR` (ids and similarities only:
they describe private images) go to ``<report_dir>/near_copies.json``, owner-only (0600, in a 0700 folder), never
to the logs.

Hashes and descriptors are cached per dataset fingerprint in ``<prepared dataset dir>/dpwave_hashes/
<fingerprint>.npy``, owner-only (0600, in a 0700 folder): they derive from private data, so they stay beside
that data. The fingerprint covers the scheme (hash or descriptor, with its shifts), the spec fields that change
the pixels (name, split, resolution, channels, labels) and every data file's path, row range, size and mtime, so
a rebuilt dataset is read again; one decoding pass fills whichever cache is missing. A dataset that is not a
local prepared TFDS dataset is read on every call.
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
from dpwave.data import near_duplicates
from dpwave.data.errors import PrivateOverlapError
from dpwave.data.source import Source

HASH_SCHEME = "blake2b-128 of dtype, shape and bytes of the decoded pixels, v1"
CACHE_DIR = "dpwave_hashes"
DIGEST_SIZE = 16
DEFAULT_THRESHOLD = near_duplicates.DEFAULT_THRESHOLD
REPORT_FLOOR = 0.995  # the report lists pairs from here up; the lower, the more pairs the index must score
REPORT_NAME = "near_copies.json"
_REPORT_PAIRS = 20
_SHOWN = 5
_BATCH_PIXELS = 2**21  # a thread decodes and describes this many pixels at once (2,048 images of 32x32)


@dataclasses.dataclass(frozen=True)
class PixelHashes:
    """The digests of a source's images, in order, and where they came from."""

    digests: np.ndarray  # (N,) bytes of DIGEST_SIZE
    cache_path: str | None  # None: not cacheable (not a local prepared TFDS dataset)
    hashed: int  # images hashed by this call; 0 when read from the cache


@dataclasses.dataclass(frozen=True)
class Descriptors:
    """The near-copy descriptors of a source's images, in order (`near_duplicates.descriptors`)."""

    vectors: np.ndarray  # (N, shifts, near_duplicates.DIM) float32
    cache_path: str | None
    computed: int  # images described by this call; 0 when read from the cache


def image_digest(image: np.ndarray) -> bytes:
    """BLAKE2b-128 of an image's dtype, shape and pixel bytes."""
    image = np.ascontiguousarray(image)
    digest = hashlib.blake2b(f"{image.dtype.str}{image.shape}".encode(), digest_size=DIGEST_SIZE)
    digest.update(image.data)
    return digest.digest()


def dataset_fingerprint(source: Source, scheme: str = HASH_SCHEME) -> str | None:
    """SHA-256 of ``scheme``, the pixel-relevant spec fields and the data files' identity; None when the source
    reads no local files."""
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
    record = {"scheme": scheme, "name": spec.name, "split": spec.split, "resolution": spec.resolution,
              "channels": spec.channels, "labels": None if spec.labels is None else list(spec.labels),
              "examples": len(source), "files": identity}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def cache_path(source: Source, scheme: str = HASH_SCHEME) -> str | None:
    """Where ``source``'s hashes (or what ``scheme`` names) are cached, or None when it cannot be."""
    fingerprint = dataset_fingerprint(source, scheme)
    if fingerprint is None:
        return None
    return os.path.join(os.path.dirname(source.data_files[0][0]), CACHE_DIR, f"{fingerprint}.npy")


def descriptor_scheme(shifts: tuple[tuple[int, int], ...]) -> str:
    return f"{near_duplicates.SCHEME}; shifts {list(shifts)}"


def _read_cache(path: str | None, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray | None:
    if path is None:
        return None
    try:
        table = np.load(io.BytesIO(files.read_bytes(path)), allow_pickle=False)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        logging.warning("unreadable content-check cache %s (%s); hashing again", path, e)
        return None
    if table.dtype != dtype or table.shape != shape:
        logging.warning("content-check cache %s holds %s %s, expected %s %s; hashing again", path,
                        table.shape, table.dtype, shape, np.dtype(dtype))
        return None
    return table


def _write_cache(path: str | None, table: np.ndarray) -> None:
    """Owner-only, atomic (`dpwave.files`); every process caches beside its own copy of the data; a failure
    only costs a re-read."""
    if path is None:
        return
    buffer = io.BytesIO()
    np.save(buffer, table)
    try:
        files.makedirs(os.path.dirname(path), private=True)
        files.write_bytes(path, buffer.getvalue(), private=True, all_processes=True)
    except OSError as e:
        logging.warning("could not cache %s (%s); the next run reads the images again", path, e)


def _describe(images: list[np.ndarray], shifts: tuple[tuple[int, int], ...]) -> np.ndarray:
    """`near_duplicates.descriptors` of images of any sizes, in order (one batch per size)."""
    out = np.empty((len(images), len(shifts), near_duplicates.DIM), np.float32)
    shapes = [image.shape for image in images]
    for shape in set(shapes):
        same = [i for i, s in enumerate(shapes) if s == shape]
        out[same] = near_duplicates.descriptors(np.stack([images[i] for i in same]), shifts)
    return out


def _read(source: Source, digests: bool, shifts: tuple[tuple[int, int], ...] | None
          ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """One decoding pass: the digests (when ``digests``) and the descriptors (when ``shifts``) of every image."""
    table = np.empty(len(source), f"S{DIGEST_SIZE}") if digests else None
    vectors = np.empty((len(source), len(shifts), near_duplicates.DIM), np.float32) if shifts else None

    if not len(source):
        return table, vectors
    batch = max(1, _BATCH_PIXELS // int(np.prod(source[0]["image"].shape[:2])))

    def read(start: int) -> tuple[list[bytes] | None, np.ndarray | None]:
        images = [source[i]["image"] for i in range(start, min(start + batch, len(source)))]
        return ([image_digest(image) for image in images] if digests else None,
                _describe(images, shifts) if shifts else None)

    # Decoding dominates and releases the GIL (PIL, array_record's thread-safe readers, hashlib, BLAS).
    with futures.ThreadPoolExecutor(min(32, os.cpu_count() or 1)) as pool:
        starts = range(0, len(source), batch)
        for start, (batch_digests, batch_vectors) in zip(starts, pool.map(read, starts)):
            stop = min(start + batch, len(source))
            if table is not None:
                table[start:stop] = batch_digests
            if vectors is not None:
                vectors[start:stop] = batch_vectors
    return table, vectors


def content(source: Source, shifts: tuple[tuple[int, int], ...] | None) -> tuple[PixelHashes, Descriptors | None]:
    """The digests and, with ``shifts``, the near-copy descriptors of every image of ``source``, from the caches
    when their fingerprints match; one decoding pass computes whichever is missing."""
    hash_path = cache_path(source)
    vector_path = cache_path(source, descriptor_scheme(shifts)) if shifts else None
    digests = _read_cache(hash_path, (len(source), DIGEST_SIZE), np.dtype(np.uint8))
    vectors = _read_cache(vector_path, (len(source), len(shifts), near_duplicates.DIM),
                          np.dtype(np.float32)) if shifts else None
    hashed = digests is None
    described = bool(shifts) and vectors is None
    if hashed or described:
        new_digests, new_vectors = _read(source, hashed, shifts if described else None)
        if hashed:
            digests = new_digests.view(np.uint8).reshape(-1, DIGEST_SIZE)
            _write_cache(hash_path, digests)
        if described:
            vectors = new_vectors
            _write_cache(vector_path, vectors)
    hashes = PixelHashes(digests.view(f"S{DIGEST_SIZE}").ravel(), hash_path, len(source) if hashed else 0)
    if not shifts:
        return hashes, None
    return hashes, Descriptors(vectors, vector_path, len(source) if described else 0)


def pixel_hashes(source: Source) -> PixelHashes:
    """The digest of every image of ``source``, from the cache when its fingerprint matches."""
    return content(source, None)[0]


def _example_id(source: Source, index: int) -> str:
    return str(source[index].get("id", f"#{index}"))


def check_disjoint(private: Source, public: Mapping[str, Source], *, threshold: float = DEFAULT_THRESHOLD,
                   report_dir: str | None = None) -> dict[str, PixelHashes]:
    """Refuses public sources that hold an image of ``private``, or a near copy of one.

    Args:
      private: the DP training set.
      public: the sources read without DP, by role (``config.data.public``, ``config.data.heldout``, ...).
      threshold: the similarity (`near_duplicates.similarity`) from which a public image is a near copy of a
        private one, in [`near_duplicates.MIN_THRESHOLD`, 1]; lower refuses more.
      report_dir: an owner-only folder of the run (e.g. the DP stage's): ``near_copies.json`` there lists, per
        role, the closest (public id, private id, similarity) pairs from `REPORT_FLOOR` up. None: no report.

    Returns:
      Every source's hashes, ``"private"`` first, then by role.

    Raises:
      PrivateOverlapError: one line naming each offending role, its count of images and a few pairs: identical
        (public id = private id) when any role holds an exact copy, near (public id ~ private id, similarity)
        otherwise.
      ValueError: ``threshold`` out of range.
    """
    near_duplicates.check_threshold(threshold)
    private_hashes, private_vectors = content(private, near_duplicates.SHIFTS)
    hashes, vectors = {"private": private_hashes}, {}
    for role, source in public.items():
        hashes[role], vectors[role] = content(source, near_duplicates.NO_SHIFT)
    _refuse_exact_copies(private, public, hashes)
    nearest = _nearest_by_role(vectors, private_vectors, floor := min(threshold, REPORT_FLOOR))
    report = _write_report(report_dir, private, public, nearest, threshold, floor) if report_dir else None
    _refuse_near_copies(private, public, nearest, threshold, report)
    logging.info("privacy boundary: no image of %s (%d), nor a near copy (similarity >= %g), in %s",
                 private.spec.label, len(private), threshold,
                 ", ".join(f"{role} ({len(s)})" for role, s in public.items()))
    return hashes


def _nearest_by_role(vectors: dict[str, Descriptors], private: Descriptors,
                     floor: float) -> dict[str, near_duplicates.Nearest]:
    """`near_duplicates.nearest_private` of every role: from the cache where both descriptor sets are cached,
    the other roles in one query."""
    paths = {role: _nearest_cache_path(private, v, floor) for role, v in vectors.items()}
    found = {role: table for role, path in paths.items()
             if (table := _read_cache(path, (len(vectors[role].vectors), 2), np.dtype(np.float64))) is not None}
    missing = [role for role in vectors if role not in found]
    if missing:
        queried = near_duplicates.nearest_private(np.concatenate([vectors[r].vectors[:, 0] for r in missing]),
                                                  private.vectors, floor)
        table = np.stack([queried.similarity, queried.private_index], 1).astype(np.float64)
        bounds = np.cumsum([0] + [len(vectors[r].vectors) for r in missing])
        for role, start, stop in zip(missing, bounds[:-1], bounds[1:]):
            found[role] = table[start:stop]
            _write_cache(paths[role], found[role])
    return {role: near_duplicates.Nearest(found[role][:, 0].astype(np.float32), found[role][:, 1].astype(np.int64))
            for role in vectors}


def _nearest_cache_path(private: Descriptors, public: Descriptors, floor: float) -> str | None:
    """Beside the private descriptors, keyed by both descriptor caches (their fingerprints) and the floor."""
    if private.cache_path is None or public.cache_path is None:
        return None
    key = json.dumps([os.path.basename(private.cache_path), os.path.basename(public.cache_path), floor])
    return os.path.join(os.path.dirname(private.cache_path), f"{hashlib.sha256(key.encode()).hexdigest()}.npy")


def _refuse_exact_copies(private: Source, public: Mapping[str, Source], hashes: dict[str, PixelHashes]) -> None:
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


def _closest(nearest: near_duplicates.Nearest, count: int) -> np.ndarray:
    """The public indices of the ``count`` highest similarities that reached the floor, highest first."""
    found = np.flatnonzero(nearest.private_index >= 0)
    return found[np.argsort(-nearest.similarity[found], kind="stable")][:count]


def _pair(source: Source, private: Source, nearest: near_duplicates.Nearest, i: int) -> tuple[str, str, float]:
    return (_example_id(source, int(i)), _example_id(private, int(nearest.private_index[i])),
            round(float(nearest.similarity[i]), 5))


def _refuse_near_copies(private: Source, public: Mapping[str, Source], nearest: dict[str, near_duplicates.Nearest],
                        threshold: float, report: str | None) -> None:
    problems = []
    for role, source in public.items():
        count = int(np.sum(nearest[role].similarity >= threshold))
        if count:
            pairs = [f"{q!r} ~ private {p!r} ({s:.4f})"
                     for q, p, s in (_pair(source, private, nearest[role], i)
                                     for i in _closest(nearest[role], min(count, _SHOWN)))]
            problems.append(f"{role} ({source.spec.label}) holds {count} of {len(source)} near copies of private "
                            f"images (e.g. {', '.join(pairs)})")
    if problems:
        where = f"; the closest pairs: {report}" if report else ""
        raise PrivateOverlapError(
            f"near copies of private images in roles read without DP, against {private.spec.label} "
            f"({len(private)} images; near copy: similarity >= {threshold}, dpwave/data/near_duplicates.py): "
            f"{'; '.join(problems)}; remove them from those datasets or use disjoint splits{where}")


def _write_report(report_dir: str, private: Source, public: Mapping[str, Source],
                  nearest: dict[str, near_duplicates.Nearest], threshold: float, floor: float) -> str:
    """Writes ``<report_dir>/near_copies.json`` (owner-only): per role, the closest pairs from ``floor`` up."""
    roles = {}
    for role, source in public.items():
        pairs = [_pair(source, private, nearest[role], i) for i in _closest(nearest[role], _REPORT_PAIRS)]
        roles[role] = {"dataset": source.spec.label, "images": len(source),
                       "near_copies": int(np.sum(nearest[role].similarity >= threshold)),
                       "at_or_above_floor": int(np.sum(nearest[role].private_index >= 0)),
                       "closest": [{"public": q, "private": p, "similarity": s} for q, p, s in pairs]}
    path = os.path.join(report_dir, REPORT_NAME)
    files.makedirs(report_dir, private=True)
    files.write_json(path, {"scheme": near_duplicates.SCHEME, "threshold": threshold, "floor": floor,
                            "private": {"dataset": private.spec.label, "images": len(private)}, "roles": roles},
                     private=True)
    return path
