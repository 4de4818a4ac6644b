"""Run-start content check (dpwave/data/overlap.py): hashing throughput and the time it adds to a run.

Rows: images hashed per second from a cold cache (decode + BLAKE2b-128 + cache write) and for the hash
alone on decoded pixels, for the mnist5k private split (2,000 32x32x1) and a synthetic flat image_folder
of ``--folder_images`` random 256x256 RGB PNGs; then ``check_data_boundary`` on the demo config (all
four mnist5k roles, 5,000 images) with a cold and a warm hash cache. Everything is built into a
temporary data dir first (build time not counted), so no cache outside it is read or written.

    python -m experiments.bench.bench_content_check --out /tmp/bench_content_check.json
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from typing import Callable

import numpy as np
from PIL import Image

from dpwave.data import DatasetSpec, Source, load, overlap
from dpwave.train import settings
from experiments.bench.common import print_table, write_json
from experiments.configs import mnist


def clear_cache(source: Source) -> None:
    shutil.rmtree(os.path.dirname(overlap.cache_path(source)), ignore_errors=True)


def median_time(fn: Callable[[], object], setup: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        setup()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def hashing_row(name: str, source: Source, repeats: int) -> dict:
    images = [source[i]["image"] for i in range(len(source))]
    cold = median_time(lambda: overlap.pixel_hashes(source), lambda: clear_cache(source), repeats)
    digest_only = median_time(lambda: [overlap.image_digest(im) for im in images], lambda: None, repeats)
    return {"dataset": name, "images": len(source), "shape": "x".join(map(str, images[0].shape)),
            "cold_images_per_s": len(source) / cold, "hash_only_images_per_s": len(source) / digest_only,
            "cold_s": cold}


def write_folder(root: str, count: int, side: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    os.makedirs(root)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(
            os.path.join(root, f"img{i:04d}.png"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder_images", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="/tmp/bench_content_check.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = os.path.join(tmp, "tfds")
        mnist_private = load(DatasetSpec("mnist5k", "private", "private", data_dir=data_dir, resolution=32,
                                         channels=1))
        folder = os.path.join(tmp, "synthetic")
        write_folder(folder, args.folder_images, 256, seed=0)
        synthetic = load(DatasetSpec("image_folder", "train", "private", data_dir=data_dir, manual_dir=folder,
                                     resolution=256, channels=3))
        rows = [hashing_row("mnist5k/private", mnist_private, args.repeats),
                hashing_row("image_folder 256px RGB", synthetic, args.repeats)]
        print_table(rows, ["dataset", "images", "shape", "cold_images_per_s", "hash_only_images_per_s", "cold_s"])

        config = mnist.get_config("demo")
        for role in settings.ROLES:
            config.data[role].data_dir = data_dir
        data = settings.read(config).data
        hashes = data.check_boundary()
        cold = median_time(data.check_boundary, lambda: clear_cache(mnist_private), args.repeats)
        warm = median_time(data.check_boundary, lambda: None, args.repeats)
        start = {"config": "mnist.py:demo", "roles": len(hashes),
                 "images": sum(len(h.digests) for h in hashes.values()), "cold_cache_s": cold, "warm_cache_s": warm}
        print_table([start])
    write_json(args.out, "content_check", rows, run_start=start, repeats=args.repeats,
               folder_images=args.folder_images)


if __name__ == "__main__":
    main()
