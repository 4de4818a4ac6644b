"""Near copies: a descriptor of each image, a similarity between two of them, and an exact index.

**Descriptor.** The luma of the decoded pixels, less a 2-pixel border, averaged over a 16x16 grid of
equal cells (area weights, so any size from 8 px works and a 32 px image has 1.75 px cells), minus its
mean and scaled to unit norm (256 float32). Brightness offsets cancel; JPEG noise averages out inside a
cell. A flat image (cell means within `FLAT_STD` gray levels) has no descriptor (all zeros) and is never
a near copy: it holds nothing to leak, and an exact copy of it is still caught by the exact check.

**Shifts.** Private images get one descriptor per shift of -1, 0 or +1 pixel on each axis (9), taken from
the pixels the shift brings into the grid, so a public image shifted by one pixel (with any fill) has
exactly the descriptor of one private variant: the dropped border holds whatever the shift filled in.

**Similarity** of two descriptors: their cosine, but with the 2x2 block of cells where they differ most
left out, ``1 - (|a - b|^2 - max over 2x2 blocks of |(a - b)_block|^2) / 2``. From 20 px, cells are at
least a pixel wide and one pixel touches at most a 2x2 block of them, so an edit confined to one pixel
only changes the similarity through the mean and the norm. It is at most 1 (identical descriptors). A
public image's similarity to the private set is the largest over private images and their shifts.

**Index** (`nearest_private`). Exact: it finds every pair at or above a floor f. Cell rows form bands of
two, and bands 0, 3, 6, ... / 1, 4, 7, ... / 2, 5, ... three groups; a 2x2 block touches at most two
groups, so a pair at similarity >= f differs by at most ``sqrt(2 (1 - f))`` on at least one whole group.
Per group, a grid over two principal axes (cells at least that wide; a projection moves by at most the
distance) pairs each block of queries only with the rows of the neighbouring cells, and one matrix product
per block and slice of rows tests the distance (with a slack for float32 rounding); only the pairs that
pass are scored.
A pair that passes no group cannot reach the floor, so nothing is missed. A private image whose 9 shifts
lie close together is one row with a radius widened by their spread.
"""
from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Iterator

import numpy as np

SCHEME = ("near-copy descriptor v1: luma, 16x16 area means inside a 2 px border, mean removed, unit norm; "
          "shifts of -1..1 px; similarity: cosine without the most different 2x2 block of cells")
GRID = 16
BORDER = 2
DIM = GRID * GRID
SHIFTS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
NO_SHIFT = ((0, 0),)
DEFAULT_THRESHOLD = 0.998
MIN_THRESHOLD = 0.9  # below: distinct digits of mnist5k (up to 0.995) are near copies, and the index slows
FLAT_STD = 0.5  # gray levels: a grid of cell means this flat has no descriptor
MIN_SIDE = 2 * BORDER + 4
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
_GROUPS = 3
_SLACK = 1e-4  # on the group tests: far above their float32 rounding
_BLOCK = 256  # queries per matrix product (at most)
_BINS = 32  # at most, per axis


@functools.lru_cache(maxsize=64)
def pooling_matrix(length: int, shift: int) -> np.ndarray:
    """(GRID, length) area weights of the cells over pixels ``[BORDER - shift, length - BORDER - shift)``.

    Pooling the image shifted by ``shift`` pixels with the unshifted matrix is pooling the original
    image with this one (for |shift| <= 1 the interval stays inside the image)."""
    if length < MIN_SIDE:
        raise ValueError(f"near-copy descriptors need images of at least {MIN_SIDE} px, got side {length}")
    low, high = BORDER - shift, length - BORDER - shift
    edges = low + (high - low) * np.arange(GRID + 1) / GRID
    pixels = np.arange(length)
    overlap = np.minimum(edges[1:, None], pixels + 1) - np.maximum(edges[:-1, None], pixels)
    weights = np.clip(overlap, 0, None)
    return (weights / weights.sum(1, keepdims=True)).astype(np.float32)


def luma(images: np.ndarray) -> np.ndarray:
    """(N, H, W) float32 luma of (N, H, W, C) uint8 images (C 1-4; alpha ignored)."""
    images = np.asarray(images)
    channels = images.shape[-1]
    if channels in (2, 4):
        images, channels = images[..., : channels - 1], channels - 1
    if channels == 1:
        return images[..., 0].astype(np.float32)
    return images.astype(np.float32) @ _LUMA


def descriptors(images: np.ndarray, shifts: tuple[tuple[int, int], ...] = NO_SHIFT) -> np.ndarray:
    """(N, len(shifts), DIM) float32 descriptors of (N, H, W, C) uint8 images, one per (dy, dx) shift."""
    gray = luma(images)
    n, height, width = gray.shape
    columns = {dx: (gray.reshape(-1, width) @ pooling_matrix(width, dx).T).reshape(n, height, GRID)
               for dx in sorted({dx for _, dx in shifts})}  # one matrix product per shift: the large one
    cells = np.stack([pooling_matrix(height, dy) @ columns[dx] for dy, dx in shifts], axis=1)
    cells = cells.reshape(n, len(shifts), DIM)
    cells -= cells.mean(-1, keepdims=True)
    norm = np.linalg.norm(cells, axis=-1, keepdims=True)
    flat = norm <= FLAT_STD * np.sqrt(DIM)
    return np.where(flat, 0.0, cells / np.where(flat, 1.0, norm)).astype(np.float32)


def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Similarity of descriptor rows (broadcast over leading axes): the cosine without the 2x2 block of cells
    where they differ most; 0 when either is flat (all zeros)."""
    squared = ((a - b) ** 2).reshape(*np.broadcast_shapes(a.shape, b.shape)[:-1], GRID, GRID)
    blocks = squared[..., :-1, :-1] + squared[..., 1:, :-1] + squared[..., :-1, 1:] + squared[..., 1:, 1:]
    value = 1.0 - (squared.sum((-2, -1)) - blocks.max((-2, -1))) / 2.0
    return np.where(_is_flat(a) | _is_flat(b), 0.0, value)


def check_threshold(threshold: float, name: str = "near-copy threshold") -> None:
    """Raises ValueError, naming the setting ``name``, unless ``threshold`` is a number in [MIN_THRESHOLD, 1]."""
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not (
            MIN_THRESHOLD <= threshold <= 1.0):
        raise ValueError(f"{name}={threshold!r} must be a number in [{MIN_THRESHOLD}, 1] (default "
                         f"{DEFAULT_THRESHOLD}; lower refuses more)")


def _is_flat(d: np.ndarray) -> np.ndarray:
    return ~np.any(d, axis=-1)


def _group_columns() -> list[np.ndarray]:
    """Descriptor columns of each group: cell rows in bands of two, band b in group b mod 3."""
    band = (np.arange(GRID) // 2) % _GROUPS
    return [np.flatnonzero(np.repeat(band == g, GRID)) for g in range(_GROUPS)]


def _augmented(part: np.ndarray, radius: np.ndarray | None) -> np.ndarray:
    """Rows of one group whose products are ``q.v - |q|^2 / 2 - |v|^2 / 2 + radius^2 / 2``, >= 0 iff
    ``|q - v| <= radius`` on that group: queries (``radius`` None) ``[q, -|q|^2 / 2, 1]``, index rows
    ``[v, 1, (radius^2 - |v|^2) / 2]``."""
    half_norm = -(part**2).sum(1, keepdims=True) / 2
    ones = np.ones_like(half_norm)
    if radius is None:
        return np.hstack([part, half_norm, ones])
    return np.hstack([part, ones, half_norm + (radius[:, None] ** 2 / 2).astype(np.float32)])


def _index_rows(private: np.ndarray, epsilon: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, owner image, radius) to index: a private image whose shifts all lie within ``epsilon`` of its
    unshifted descriptor is one row of radius ``epsilon + that distance`` (every pair its shifts could
    pass, it passes); any other, one row of radius ``epsilon`` per shift. Flat descriptors are left out."""
    center = private[:, private.shape[1] // 2]
    spread = np.linalg.norm(private - center[:, None], axis=-1).max(1)
    live = ~_is_flat(private)
    one = live.all(1) & (spread <= epsilon)
    many = np.flatnonzero(live.any(1) & ~one)
    rows = np.concatenate([center[one], private[many][live[many]]])
    owner = np.concatenate([np.flatnonzero(one), np.repeat(many, live[many].sum(1))])
    radius = np.concatenate([epsilon + spread[one], np.full(int(live[many].sum()), epsilon)])
    return rows, owner, radius


@dataclasses.dataclass(frozen=True)
class Nearest:
    """Each public image's most similar private image, where at or above the floor."""

    similarity: np.ndarray  # (N_public,) float32; 0 where nothing reached the floor
    private_index: np.ndarray  # (N_public,) int64 private image; -1 where nothing reached the floor


def nearest_private(public: np.ndarray, private: np.ndarray, floor: float) -> Nearest:
    """For each public descriptor (N, DIM), the private image (M, S, DIM: S shifts) of highest similarity
    when at least ``floor``; exact (see the module docstring)."""
    if not 0.0 < floor <= 1.0:
        raise ValueError(f"floor={floor!r} must lie in (0, 1]")
    epsilon = float(np.sqrt(2.0 * (1.0 - floor)))
    rows, owner, radius = _index_rows(private, epsilon)
    wide = radius > epsilon  # one row for all the shifts of its image
    queries = np.flatnonzero(~_is_flat(public))
    best = np.zeros(len(public), np.float32)
    index = np.full(len(public), -1, np.int64)
    if not (rows.size and queries.size):
        return Nearest(best, index)
    for columns in _group_columns():
        for query, row in _group_candidates(public[queries][:, columns], rows[:, columns], radius):
            query = queries[query]
            values = similarity(public[query], rows[row])
            if np.any(several := wide[row]):
                values[several] = similarity(public[query[several], None], private[owner[row[several]]]).max(1)
            keep = values >= floor
            if np.any(keep):
                _keep_best(best, index, query[keep], owner[row[keep]], values[keep])
    return Nearest(best, index)


def _group_candidates(queries: np.ndarray, rows: np.ndarray,
                      radius: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(query, row) of the pairs within ``radius`` of each other on one group.

    A grid over the rows' first two principal axes, of cells at least the largest radius wide: a pair within
    it differs by at most that on each axis, so it lies in neighbouring cells. Rows and queries are sorted by
    cell (first axis, then second); a block of up to `_BLOCK` queries of one first-axis cell, spanning
    second-axis cells lo..hi, meets the rows of cells (first - 1..first + 1, lo - 1..hi + 1): three slices, one
    matrix product each (see `_augmented`)."""
    axes = _principal_axes(rows)
    row_cells, query_cells = _cells(rows @ axes, queries @ axes, float(radius.max()) + _SLACK)
    size = int(max(row_cells.max(), query_cells.max())) + 2
    row_key = row_cells @ np.array([size, 1])
    row_order = np.argsort(row_key, kind="stable")
    row_key = row_key[row_order]
    keys = _augmented(rows[row_order], radius[row_order])
    augmented = _augmented(queries, None)
    query_key = query_cells @ np.array([size, 1])
    query_order = np.argsort(query_key, kind="stable")
    stripes = query_cells[query_order, 0]
    for block in np.split(query_order, _block_starts(stripes)):
        stripe, low, high = query_cells[block[0], 0], query_cells[block[0], 1], query_cells[block[-1], 1]
        for first in (stripe - 1, stripe, stripe + 1):
            a, b = np.searchsorted(row_key, [first * size + low - 1, first * size + high + 1 + 1])
            if b > a:
                hits = np.flatnonzero(augmented[block] @ keys[a:b].T >= -_SLACK)
                query, row = np.divmod(hits, b - a)
                yield block[query], row_order[a + row]


def _block_starts(stripes: np.ndarray) -> np.ndarray:
    """Where the sorted queries split into blocks: at each new first-axis cell, and every `_BLOCK` queries."""
    new = np.flatnonzero(np.r_[True, stripes[1:] != stripes[:-1]])
    ends = np.r_[new[1:], len(stripes)]
    return np.concatenate([np.arange(a, b, _BLOCK) for a, b in zip(new, ends)])[1:]


def _cells(row_points: np.ndarray, query_points: np.ndarray, reach: float) -> tuple[np.ndarray, np.ndarray]:
    """Integer cells (from 1) of rows and queries on a grid at least ``reach`` wide, `_BINS` cells per axis at
    most."""
    low = np.minimum(row_points.min(0), query_points.min(0))
    high = np.maximum(row_points.max(0), query_points.max(0))
    width = np.maximum(reach, (high - low) / _BINS)
    return (((row_points - low) // width).astype(np.int64) + 1,
            ((query_points - low) // width).astype(np.int64) + 1)


def _principal_axes(rows: np.ndarray, count: int = 2, steps: int = 20) -> np.ndarray:
    """(dim, count) orthonormal columns near the rows' first principal axes (subspace iteration; any
    orthonormal columns keep the search exact, good ones only make it faster)."""
    centered = rows - rows.mean(0)
    covariance = centered.T @ centered
    axes = np.random.default_rng(0).standard_normal((rows.shape[1], count)).astype(np.float32)
    for _ in range(steps):
        axes = np.linalg.qr(covariance @ axes)[0]
    return axes


def _keep_best(best: np.ndarray, index: np.ndarray, rows: np.ndarray, private: np.ndarray,
               values: np.ndarray) -> None:
    """Updates each row's best (value, private index) with these pairs (highest value first)."""
    order = np.lexsort((-values, rows))
    rows, private, values = rows[order], private[order], values[order]
    first = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]])
    rows, private, values = rows[first], private[first], values[first]
    better = values > best[rows]
    best[rows[better]] = values[better]
    index[rows[better]] = private[better]
