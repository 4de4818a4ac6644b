"""A training stage's batches computed ahead of its step on worker threads (grain), delivered in step order.

Batch ``i`` is ``produce(i)``, a pure function of the step, so the batches are the same whatever the number of
workers or the prefetch depth, and a resumed stage starts its stream at its restored step. Workers are threads of
this process (PIL decoding and numpy gathers release the GIL): private examples never leave the process, and no
file is written. A batch computed ahead of a stop (budget, preemption) is dropped unused; an error raised while
producing batch ``i`` surfaces unchanged when step ``i`` asks for it.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TypeVar

import grain

T = TypeVar("T")


def check_options(workers: int, depth: int) -> None:
    """Raises ValueError unless ``workers >= 0`` and ``depth >= max(1, workers)`` (ints)."""
    for name, value in (("workers", workers), ("depth", depth)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name}={value!r} must be an int")
    if workers < 0:
        raise ValueError(f"workers={workers} must be >= 0 (0: each batch is made when its step asks for it)")
    if depth < max(1, workers):
        raise ValueError(f"depth={depth} must be >= max(1, workers={workers}): fewer steps ahead than workers "
                         "leaves workers idle")


@contextlib.contextmanager
def prefetched(produce: Callable[[int], T], start: int, stop: int, *, workers: int,
               depth: int) -> Iterator[Iterator[T]]:
    """``produce(start), ..., produce(stop - 1)`` in order; with ``workers`` > 0 made on that many threads, at most
    ``depth`` steps ahead of the consumer, else in the consumer's thread. Leaving the context stops the workers."""
    check_options(workers, depth)
    if workers == 0:
        yield (produce(i) for i in range(start, stop))
        return
    batches = grain.MapDataset.range(start, stop).map(produce)
    options = grain.ReadOptions(num_threads=workers, prefetch_buffer_size=depth)
    iterator = iter(batches.to_iter_dataset(options, allow_nones=True))  # a None batch is a batch, not a gap
    try:
        yield iterator
    finally:
        iterator.close()
