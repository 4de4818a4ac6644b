"""Input pipeline: images per second delivered at 256x256 RGB, single thread vs worker threads, and the
input-wait fraction of the refiner and pretraining stages.

    python -m experiments.bench.bench_input --out experiments/bench/results/bench_input.json

A 256px `image_folder` is written from crops of the scikit-image photos (random square crops, flips; grayscale
photos as RGB) and built into a temporary data dir (build time not counted). Throughput: `--steps` batches of
`--batch` images of a `ShuffleSampler`, made by `Source.get_batch` in the consumer's thread ("single", the path
before dpwave.data.prefetch) and through `prefetch.prefetched` with 1 and 2 worker threads (depth 4), timed
round-robin over `--rounds` rounds; ratios are to "single" in the same round. Stages: the pipeline's own
tokenizer (a few steps, so pretraining has a tokenizer), pretrain and refiner stages on that folder with small
models (`small_settings`), run through the loop with 0 and 2 input workers; the wait fraction is the loop's
(`summary.json`: time blocked on the next batch over the stage's wall time, compilation and checkpoints included).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import skimage.data
from PIL import Image

from dpwave.data import DatasetSpec, ShuffleSampler, Source, load
from dpwave.data.prefetch import prefetched
from dpwave.train import distributed, loop, pipeline
from dpwave.train import settings as settings_lib
from dpwave.train.stages.base import Context
from dpwave.train.stages.pretrain import STAGE as PRETRAIN
from dpwave.train.stages.refiner import STAGE as REFINER
from dpwave.train.stages.tokenizer import STAGE as TOKENIZER
from experiments.bench.common import print_table, write_json
from experiments.configs import mnist

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "colorwheel", "camera", "moon", "brick", "grass", "gravel", "cell", "coins", "clock")
SIDE = 256


def write_photo_folder(root: str, count: int, seed: int) -> None:
    """`count` distinct PNGs: random square crops (a third of the photo's short side or more) of the photos,
    randomly flipped; the builder center-crops and resizes them to SIDE."""
    rng = np.random.default_rng(seed)
    photos = []
    for name in PHOTOS:
        image = np.asarray(getattr(skimage.data, name)())
        photos.append(np.repeat(image[..., None], 3, -1) if image.ndim == 2 else image[..., :3])
    os.makedirs(os.path.join(root, "train", "photos"))
    for k in range(count):
        photo = photos[k % len(photos)]
        h, w = photo.shape[:2]
        side = int(rng.integers(min(h, w) // 3, min(h, w) + 1))
        top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = photo[top: top + side, left: left + side]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        Image.fromarray(np.ascontiguousarray(crop)).save(os.path.join(root, "train", "photos", f"{k:04d}.png"))


def throughput(source: Source, args: argparse.Namespace) -> list[dict]:
    """Images per second of each mode, round-robin; the median over rounds and the median per-round ratio."""
    sampler = ShuffleSampler(len(source), args.batch, seed=0)

    def produce(i: int) -> dict:
        return source.get_batch(sampler.batch(i))

    def single() -> None:
        for i in range(args.steps):
            produce(i)

    def workers(n: int):
        def run() -> None:
            with prefetched(produce, 0, args.steps, workers=n, depth=4) as batches:
                for _ in batches:
                    pass
        return run

    modes = {"single (before)": single, "1 worker": workers(1), "2 workers": workers(2)}
    rates: dict[str, list[float]] = {m: [] for m in modes}
    single()  # warm the page cache
    for _ in range(args.rounds):
        for name, run in modes.items():
            start = time.perf_counter()
            run()
            rates[name].append(args.steps * args.batch / (time.perf_counter() - start))
    base = rates["single (before)"]
    return [{"mode": name, "images_per_s": statistics.median(r), "min": min(r), "max": max(r),
             "ratio_to_single": statistics.median([a / b for a, b in zip(r, base)])} for name, r in rates.items()]


def small_settings(spec: DatasetSpec, steps: int, batch: int, workers: int) -> settings_lib.Settings:
    """`mnist.py:demo` on the photo folder at 256x256x3, unconditioned, Haar 3 levels (32x32 coarse band), with
    small models; `perf.input_workers` = `workers`."""
    config = mnist.get_config("demo")
    with config.unlocked():
        config.data.update(image_size=SIDE, channels=3, condition="none", num_classes=None)
        config.data.public.update(name="image_folder", split="train", manual_dir=spec.manual_dir,
                                  data_dir=spec.data_dir, override_private_default=True, in_memory=False)
        config.wavelet.levels = 3
        config.tokenizer.model.update(patch_sizes=(2, 2, 4, 8), codebook_size=64, code_dim=8, width=16, depth=1)
        config.tokenizer.update(steps=2, batch_size=batch)
        config.transformer.update(width=32, depth=1, num_heads=2, mlp_dim=64)
        config.pretrain.update(steps=steps, batch_size=batch)
        config.refiner.model.update(widths=(16, 16, 16), num_blocks=1)
        config.refiner.update(steps=steps, batch_size=batch)
        config.perf.update(input_workers=workers, input_prefetch=max(1, 2 * workers))
        config.checkpoint.every_steps = steps
        config.log_every_steps = steps
    return settings_lib.read(config)


def stage_rows(spec: DatasetSpec, args: argparse.Namespace, root: str) -> list[dict]:
    """Wait fraction of pretrain and refiner, with 0 and 2 input workers (a fresh stage directory each)."""
    rows = []
    for workers in (0, 2):
        run = small_settings(spec, args.stage_steps, args.batch, workers)
        workdir = os.path.join(root, f"workers{workers}")
        ctx = Context(run, workdir, distributed.make_data_mesh(), pipeline.stage_inputs(run))
        for stage in (TOKENIZER, PRETRAIN, REFINER):
            stage.run(ctx)
            if stage is TOKENIZER:
                continue
            summary = loop.read_summary(ctx.dir(stage.name))
            rows.append({"stage": stage.name, "input_workers": workers, "steps": summary["final_step"],
                         "batch": args.batch, "wall_s": summary["wall_time_s"], "input_wait_s": summary["input_wait_s"],
                         "input_wait_fraction": summary["input_wait_fraction"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8, help="batches per throughput measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stage_steps", type=int, default=20)
    parser.add_argument("--out", default="experiments/bench/results/bench_input.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_input_") as tmp:
        folder = os.path.join(tmp, "photos256")
        write_photo_folder(folder, args.images, seed=0)
        spec = DatasetSpec("image_folder", "train", "public", data_dir=os.path.join(tmp, "tfds"), manual_dir=folder,
                           resolution=SIDE, channels=3, override_private_default=True)
        source = load(spec)
        rows = throughput(source, args)
        print_table(rows, ["mode", "images_per_s", "min", "max", "ratio_to_single"])
        stages = stage_rows(spec, args, tmp)
        print_table(stages)
    load_after = os.getloadavg()
    print(f"load average (1, 5, 15 min): before {load_before}, after {load_after}")
    write_json(args.out, "input", rows, stages=stages, args=vars(args), load_average={
        "before": load_before, "after": load_after}, photos=list(PHOTOS))


if __name__ == "__main__":
    main()
