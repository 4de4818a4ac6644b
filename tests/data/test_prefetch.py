"""dpwave.data.prefetch: batches made on worker threads equal the single-thread path bit for bit, in step order,
for any worker count and depth, from any start step; a worker's error surfaces as the same one-line DataError."""
from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dpwave.data import DataError, DatasetSpec, ShuffleSampler, load
from dpwave.privacy import PoissonSampler
from dpwave.data.prefetch import prefetched

STEPS = 9
BATCH = 4  # 23 images: 5 steps per epoch, so the steps cross epoch boundaries


@pytest.fixture(scope="module")
def folder_spec(tmp_path_factory) -> DatasetSpec:
    """An image_folder of 23 distinct RGB PNGs of mixed sizes, built at 8x8 with two classes."""
    root = tmp_path_factory.mktemp("prefetch") / "pics"
    rng = np.random.default_rng(5)
    for k in range(23):
        path = root / "train" / f"c{k % 2}" / f"{k:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12 + k % 3, 10, 3), dtype=np.uint8)).save(path)
    return DatasetSpec("image_folder", "train", "public", data_dir=os.fspath(root.parent / "tfds"),
                       manual_dir=os.fspath(root), resolution=8, override_private_default=True)


def consume(produce, start, stop, workers, depth):
    """Everything the stream yields, under a timeout (a hang fails instead of blocking the suite)."""
    def run():
        with prefetched(produce, start, stop, workers=workers, depth=depth) as batches:
            return list(batches)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(run).result(timeout=30)


def assert_same(got, expected):
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape
            np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.integration
def test_worker_batches_equal_the_single_thread_path_for_every_worker_count_depth_and_start(folder_spec):
    source = load(folder_spec)
    sampler = ShuffleSampler(len(source), BATCH, seed=3)
    serial = [source.get_batch(sampler.batch(i)) for i in range(STEPS)]
    assert len({b["image"].tobytes() for b in serial}) == STEPS  # distinct batches: order matters

    def produce(i):
        return source.get_batch(sampler.batch(i))

    for workers, depth in ((0, 1), (1, 1), (1, 3), (2, 2), (3, 7)):
        assert_same(consume(produce, 0, STEPS, workers, depth), serial)
    # A resumed stage starts its stream at its restored step and gets the same batches from there.
    for start in (1, 4, 6):
        assert_same(consume(produce, start, STEPS, 2, 4), serial[start:])


@pytest.mark.unit
def test_poisson_draws_are_unchanged_by_workers_and_depth():
    sampler = PoissonSampler(500, 0.05, seed=11, bucket_multiple=8)
    examples = np.arange(500, dtype=np.int32) * 7

    def produce(i):
        indices, mask = sampler.batch(i)
        return {"examples": examples[indices], "indices": indices, "mask": mask}

    expected = []
    for i in range(12):
        indices, mask = sampler.batch(i)
        expected.append({"examples": examples[indices], "indices": indices, "mask": mask})
    assert len({int(b["mask"].sum()) for b in expected}) > 1  # realized sizes vary step to step
    for workers, depth in ((0, 1), (2, 2), (2, 6), (4, 4)):
        assert_same(consume(produce, 0, 12, workers, depth), expected)


@pytest.mark.unit
def test_none_batches_are_delivered_not_skipped():
    for workers in (0, 2):
        assert consume(lambda i: None if i % 2 else i, 0, 5, workers, 2) == [0, None, 2, None, 4]


@pytest.mark.unit
def test_a_stream_left_early_stops_asking_for_batches():
    asked: list[int] = []

    def produce(i):
        asked.append(i)
        return i

    with prefetched(produce, 3, 1000, workers=2, depth=4) as batches:
        assert [next(batches) for _ in range(5)] == [3, 4, 5, 6, 7]
    assert max(asked) <= 7 + 4 and min(asked) == 3  # at most `depth` steps made ahead, none before the start


@pytest.mark.integration
def test_an_unreadable_record_is_a_one_line_data_error_naming_the_file_from_a_worker(folder_spec, tmp_path):
    load(folder_spec)  # built
    copy = tmp_path / "tfds"
    shutil.copytree(folder_spec.data_dir, copy)
    (path,) = glob.glob(f"{copy}/image_folder/*/1.0.0/*.array_record-*")
    raw = bytearray(Path(path).read_bytes())
    raw[200:400] = bytes(200)  # inside the first chunk: its hash no longer matches
    Path(path).write_bytes(bytes(raw))
    source = load(dataclasses.replace(folder_spec, data_dir=os.fspath(copy)))

    def produce(i):
        return source.get_batch([i])

    for workers in (0, 2):
        with pytest.raises(DataError) as info:
            consume(produce, 0, 4, workers, 2)
        message = str(info.value)
        assert "\n" not in message and "cannot read example 0" in message and path in message


@pytest.mark.unit
@pytest.mark.parametrize("workers, depth, match", [(-1, 1, "workers=-1 must be >= 0"),
                                                   (2, 1, r"depth=1 must be >= max\(1, workers=2\)"),
                                                   (0, 0, "depth=0"), (1.5, 2, "workers=1.5 must be an int")])
def test_bad_options_are_refused(workers, depth, match):
    with pytest.raises(ValueError, match=match), prefetched(lambda i: i, 0, 2, workers=workers, depth=depth):
        pass
