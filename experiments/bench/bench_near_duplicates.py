"""Near-copy check (dpwave/data/near_duplicates.py via overlap.check_disjoint): throughput, false and true positives.

Tables, all on decoded pixels in memory (decoding is bench_content_check's):
- descriptors per second: mnist5k's private split (2,000 32x32x1) and 256x256 RGB crops of the scikit-image
  photos, with the 9 shifts of a private set and the 1 of a public role.
- index query at the check's floor (0.995): ``--private`` x ``--public`` synthetic descriptors drawn from a
  Gaussian with the mean and covariance of mnist5k's (with its one-pixel shift offsets: 9 rows per private image,
  as at 32 px) or of 256 px photo crops' (their shifts mostly collapse into one row); 200 planted near copies
  must all be found. ``--timed_public`` times fewer queries and scales the time (an upper bound: fewer queries
  share fewer grid cells).
- false positives at the default threshold: mnist5k's public, heldout and test splits against its private split;
  all 5,000 mnist5k digits in random halves (4 seeds); scikit-learn's 8x8 digits upsampled to 32 px, in halves;
  crops of the left halves of 18 scikit-image photos against crops of their right halves (32-256 px). The same
  for a 64-bit difference hash (dHash, Hamming distance <= 10), which a mostly black digit makes degenerate.
- true positives: every edit (one random pixel inverted, the brightest pixel set to black, +1 brightness, JPEG
  quality 95, one-pixel shifts up, down, left, right) of every private digit and of the 18 photos at 32, 64,
  128 and 256 px: the fraction the index finds at or above the threshold, matched to its source.
- run start: ``check_boundary`` of mnist.py:demo (exact and near check, all four roles), cold and warm caches.

    python -m experiments.bench.bench_near_duplicates --out experiments/bench/results/bench_near_duplicates.json
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np
from PIL import Image
from skimage import data as skimage_data
from sklearn.datasets import load_digits

from dpwave.data import DatasetSpec, load, near_duplicates, overlap
from dpwave.data.builders.mnist5k import mnist5k_arrays, split_rows
from dpwave.train import settings
from experiments.bench.common import print_table, write_json
from experiments.configs import mnist

PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
          "retina", "colorwheel", "moon", "coins", "cell", "grass", "page", "brick", "gravel", "clock", "text")
SIDES = (32, 64, 128, 256)
FLOOR = overlap.REPORT_FLOOR
THRESHOLD = near_duplicates.DEFAULT_THRESHOLD
DHASH_DISTANCE = 10


def seconds(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    image = image[..., None] if image.ndim == 2 else image[..., :3]
    return np.repeat(image, 3, -1) if image.shape[-1] == 1 else image


def resize(image: np.ndarray, side: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.LANCZOS))


def center_square(image: np.ndarray, side: int) -> np.ndarray:
    h, w = image.shape[:2]
    m = min(h, w)
    return resize(image[(h - m) // 2: (h - m) // 2 + m, (w - m) // 2: (w - m) // 2 + m], side)


def half_crops(image: np.ndarray, half: int, side: int, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``count`` random square crops inside the left (0) or right (1) half of ``image``, resized to ``side``."""
    h, w = image.shape[:2]
    x0, x1 = (0, w // 2) if half == 0 else (w // 2, w)
    largest = min(h, x1 - x0)
    crops = []
    for _ in range(count):
        c = int(rng.integers(largest // 3, largest + 1))
        y, x = int(rng.integers(0, h - c + 1)), int(rng.integers(x0, x1 - c + 1))
        crops.append(resize(image[y: y + c, x: x + c], side))
    return crops


# Edits of one uint8 HWC image.
def invert_random_pixel(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = image.copy()
    y, x = int(rng.integers(image.shape[0])), int(rng.integers(image.shape[1]))
    out[y, x] = 255 - out[y, x]
    return out


def brightest_to_black(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = image.copy()
    out[np.unravel_index(np.argmax(image.sum(-1)), image.shape[:2])] = 0
    return out


def plus_one(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(image.astype(np.int16) + 1, 0, 255).astype(np.uint8)


def jpeg95(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, "JPEG", quality=95)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue()))).reshape(image.shape)


def shift(dy: int, dx: int) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
    def edit(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w = image.shape[:2]
        return np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")[1 - dy: 1 - dy + h, 1 - dx: 1 - dx + w]
    return edit


EDITS = {"pixel inverted": invert_random_pixel, "brightest pixel to black": brightest_to_black,
         "+1 brightness": plus_one, "JPEG q95": jpeg95, "shift up": shift(-1, 0), "shift down": shift(1, 0),
         "shift left": shift(0, -1), "shift right": shift(0, 1)}


def describe(images: list[np.ndarray] | np.ndarray, shifts=near_duplicates.NO_SHIFT) -> np.ndarray:
    return near_duplicates.descriptors(np.stack(images), shifts)


def nearest(public: np.ndarray, private: np.ndarray, floor: float = FLOOR) -> near_duplicates.Nearest:
    return near_duplicates.nearest_private(public[:, 0], private, floor)


# Throughput.
def descriptor_rows(digits: np.ndarray, photos: list[np.ndarray], repeats: int) -> list[dict]:
    """Descriptors per second in batches of 2M pixels, as the check computes them (2,048 digits, 32 crops)."""
    rng = np.random.default_rng(0)
    crops = np.stack([c for p in photos for c in half_crops(p, 0, 256, 17, rng)])  # 306 crops
    rows = []
    for name, images in (("mnist5k/private 32x32x1", digits), ("photo crops 256x256x3", crops)):
        batch = max(1, 2**21 // (images.shape[1] * images.shape[2]))
        for label, shifts in (("private (9 shifts)", near_duplicates.SHIFTS), ("public (1)", near_duplicates.NO_SHIFT)):
            t = seconds(lambda: [near_duplicates.descriptors(images[i: i + batch], shifts)
                                 for i in range(0, len(images), batch)], repeats)
            rows.append({"images": name, "role": label, "count": len(images), "images_per_s": len(images) / t})
    return rows


def gaussian_like(reference: np.ndarray, count: int, shifted: bool, rng: np.random.Generator) -> np.ndarray:
    """(count, 9 or 1, DIM) unit descriptors from a Gaussian with the mean and covariance of the unshifted
    ``reference`` descriptors (N, 9, DIM); with ``shifted``, plus the shift offsets of random reference images."""
    center = reference[:, 4]
    factor = np.linalg.cholesky(np.cov(center, rowvar=False) + 1e-6 * np.eye(near_duplicates.DIM))
    out = np.empty((count, 9 if shifted else 1, near_duplicates.DIM), np.float32)
    for start in range(0, count, 8192):
        n = min(8192, count - start)
        x = (center.mean(0) + rng.standard_normal((n, near_duplicates.DIM)) @ factor.T)[:, None]
        if shifted:
            x = x + (reference - reference[:, 4:5])[rng.integers(0, len(reference), n)]
        x -= x.mean(-1, keepdims=True)
        out[start: start + n] = x / np.linalg.norm(x, axis=-1, keepdims=True)
    return out


def index_rows(references: dict[str, np.ndarray], private: int, public: int, timed: int,
               planted: int) -> list[dict]:
    rows = []
    for regime, reference in references.items():
        rng = np.random.default_rng(1)
        private_set = gaussian_like(reference, private, True, rng)
        queries = gaussian_like(reference, timed, False, rng)[:, 0]
        sources = rng.choice(private, planted, replace=False)
        copies = private_set[sources, rng.integers(0, 9, planted)]
        copies += 0.002 * rng.standard_normal(copies.shape).astype(np.float32)
        queries[:planted] = copies / np.linalg.norm(copies, axis=1, keepdims=True)
        start = time.perf_counter()
        found = near_duplicates.nearest_private(queries, private_set, FLOOR)
        elapsed = time.perf_counter() - start
        rows.append({"regime": regime, "private": private, "queries": timed, "seconds": elapsed,
                     "queries_per_s": timed / elapsed, "scaled_s_for_public": elapsed * public / timed,
                     "public": public, "planted_found": int(np.sum(found.private_index[:planted] == sources)),
                     "planted": planted, "other_found": int(np.sum(found.private_index[planted:] >= 0)),
                     "load_average": os.getloadavg()[0]})
    return rows


# False and true positives.
def dhash(images: np.ndarray) -> np.ndarray:
    """(N, 64) bool difference hashes: 9x8 grayscale, left pixel brighter than its right neighbour."""
    small = np.stack([np.asarray(Image.fromarray(near_duplicates.luma(im[None])[0].astype(np.uint8)).resize(
        (9, 8), Image.Resampling.LANCZOS), np.int16) for im in images])
    return (small[:, :, :-1] > small[:, :, 1:]).reshape(len(images), -1)


def fp_row(name: str, public: np.ndarray, private: np.ndarray) -> dict:
    found = nearest(describe(public), describe(private, near_duplicates.SHIFTS), 0.9)
    distance = (dhash(public)[:, None] != dhash(private)[None]).sum(-1).min(1)
    return {"set": name, "public": len(public), "private": len(private),
            "refused": int(np.sum(found.similarity >= THRESHOLD)),
            "rate": float(np.mean(found.similarity >= THRESHOLD)), "max_similarity": float(found.similarity.max()),
            "at_or_above_0.99": int(np.sum(found.similarity >= 0.99)),
            "dhash_refused_rate": float(np.mean(distance <= DHASH_DISTANCE))}


def mnist_halves(images: np.ndarray, seeds: int) -> dict:
    vectors = describe(images, near_duplicates.SHIFTS)
    best = np.zeros(len(images), np.float32)
    for seed in range(seeds):
        order = np.random.default_rng(seed).permutation(len(images))
        for a, b in ((order[::2], order[1::2]), (order[1::2], order[::2])):
            best[a] = np.maximum(best[a], nearest(vectors[a][:, 4:5], vectors[b], 0.99).similarity)
    return {"set": f"mnist5k, all 5,000 in random halves ({seeds} seeds)", "public": len(images),
            "private": len(images) // 2, "refused": int(np.sum(best >= THRESHOLD)),
            "rate": float(np.mean(best >= THRESHOLD)), "max_similarity": float(best.max()),
            "at_or_above_0.99": int(np.sum(best >= 0.99))}


def fp_rows(images: np.ndarray, rows: dict[str, np.ndarray], photos: list[np.ndarray], seeds: int) -> list[dict]:
    out = [fp_row(f"mnist5k {name} vs private", images[rows[name]], images[rows["private"]])
           for name in ("public", "heldout", "test")]
    out.append(mnist_halves(images, seeds))
    small = (load_digits().images * 255 / 16).astype(np.uint8)
    upsampled = np.stack([resize(d, 32) for d in small])[..., None]
    out.append(fp_row("sklearn 8x8 digits at 32 px, halves", upsampled[1::2], upsampled[::2]))
    for side in SIDES:
        rng = np.random.default_rng(side)
        left = np.stack([c for p in photos for c in half_crops(p, 0, side, 8, rng)])
        right = np.stack([c for p in photos for c in half_crops(p, 1, side, 8, rng)])
        out.append(fp_row(f"photo crops {side} px, right vs left halves", right, left))
    return out


def tp_rows(name: str, private: np.ndarray) -> list[dict]:
    vectors = describe(private, near_duplicates.SHIFTS)
    rng = np.random.default_rng(2)
    rows = []
    for edit, fn in EDITS.items():
        edited = describe([fn(image, rng) for image in private])
        similarity = near_duplicates.similarity(edited, vectors).max(1)
        found = nearest(edited, vectors, THRESHOLD)
        rows.append({"images": name, "edit": edit, "count": len(private),
                     "caught": float(np.mean(found.private_index == np.arange(len(private)))),
                     "min_similarity": float(similarity.min())})
    return rows


def dhash_stats(digits: np.ndarray, photos: np.ndarray) -> dict:
    return {"mnist5k_zero_bits_mean": float(64 - dhash(digits).sum(1).mean()),
            "photos_256_zero_bits_mean": float(64 - dhash(photos).sum(1).mean()),
            "distance": DHASH_DISTANCE}


def run_start(repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        config = mnist.get_config("demo")
        for role in settings.ROLES:
            config.data[role].data_dir = os.path.join(tmp, "tfds")
        data = settings.read(config).data
        data.check_boundary()  # builds the datasets
        private_cache = os.path.dirname(overlap.cache_path(load(DatasetSpec.from_config(config.data.private))))

        def cold() -> None:  # the private set's hashes, descriptors and nearest pairs computed again
            shutil.rmtree(private_cache, ignore_errors=True)
            data.check_boundary()
        return {"config": "mnist.py:demo", "images": 5000, "cold_private_cache_s": seconds(cold, repeats),
                "warm_s": seconds(data.check_boundary, repeats)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--private", type=int, default=30_000)
    parser.add_argument("--public", type=int, default=100_000)
    parser.add_argument("--timed_public", type=int, default=0, help="queries timed (0: --public), then scaled")
    parser.add_argument("--planted", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="/tmp/bench_near_duplicates.json")
    args = parser.parse_args()
    images, labels = mnist5k_arrays()
    rows = split_rows(labels)
    originals = [rgb(getattr(skimage_data, name)()) for name in PHOTOS]
    throughput = descriptor_rows(images[rows["private"]], originals, args.repeats)
    print_table(throughput)
    rng = np.random.default_rng(3)
    crops = np.stack([c for p in originals for c in half_crops(p, 0, 256, 20, rng)])
    references = {"like mnist5k at 32 px": describe(images, near_duplicates.SHIFTS),
                  "like photo crops at 256 px": describe(crops, near_duplicates.SHIFTS)}
    index = index_rows(references, args.private, args.public, args.timed_public or args.public, args.planted)
    print_table(index)
    false_positives = fp_rows(images, rows, originals, args.seeds)
    print_table(false_positives)
    true_positives = tp_rows("mnist5k/private", images[rows["private"]])
    for side in SIDES:
        true_positives += tp_rows(f"18 photos {side} px", np.stack([center_square(p, side) for p in originals]))
    print_table(true_positives)
    dhash_info = dhash_stats(images[rows["private"]], np.stack([center_square(p, 256) for p in originals]))
    print(dhash_info)
    start = run_start(args.repeats)
    print_table([start])
    write_json(args.out, "near_duplicates", throughput, index=index, false_positives=false_positives,
               true_positives=true_positives, dhash=dhash_info, run_start=start, threshold=THRESHOLD, floor=FLOOR,
               args=vars(args), load_average=os.getloadavg())


if __name__ == "__main__":
    main()
