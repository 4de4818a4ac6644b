"""Spectral tokenizer benchmark: the pipeline's tokenizer stage on public data, round-trip quality on held-out data.

Side by side in one run: mnist5k (train on the 1,500 `public` digits, evaluate on the 1,000 `test`
digits) and 32x32 RGB photo crops (train on astronaut/coffee/immunohistochemistry, written as an
`image_folder`; evaluate on chelsea/rocket), for each requested codebook update rule. Training is the
pipeline's own tokenizer stage (dpwave/train/stages/tokenizer.py: its task, loop, checkpoints) on the
settings of `mnist.py:demo` with the tokenizer and the public dataset replaced. Reports PSNR of the
all-scale decode and of the coarse-only decode (vs the true coarse-only image, and vs the image;
`coarse_ceiling` is the true coarse-only image vs the image), codebook usage and perplexity per scale on
the evaluation set, tokens per image per scale and the stage's wall time (compilation and checkpoints
included).

    python -m experiments.bench.bench_tokenizer --out /tmp/dpwave_bench/tokenizer.json
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from collections.abc import Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import skimage.data
from PIL import Image

from dpwave import wavelets
from dpwave.data import DatasetSpec, Source, load, to_float
from dpwave.models import tokenizer as tok
from dpwave.train.stages.tokenizer import STAGE as TOKENIZER
from experiments.bench.common import demo_settings, last_logged, print_table, train_stage, write_json

TRAIN_PHOTOS = ("astronaut", "coffee", "immunohistochemistry")
TEST_PHOTOS = ("chelsea", "rocket")


def photo_patches(names: Sequence[str], count: int, *, size: int = 32, seed: int = 0) -> Source:
    """A public Source of ``count`` random ``size`` x ``size`` RGB crops of scikit-image photos.

    Crops are drawn evenly from the photos, half at full resolution and half from the photo
    downscaled 2x (more structure per crop); deterministic from ``seed``.
    """
    rng = np.random.default_rng(seed)
    photos = []
    for name in names:
        full = getattr(skimage.data, name)()[..., :3]
        h, w = full.shape[:2]
        half = np.asarray(Image.fromarray(full).resize((w // 2, h // 2), Image.Resampling.LANCZOS))
        photos.append((full, half))
    crops = []
    for i in range(count):
        photo = photos[i % len(names)][(i // len(names)) % 2]
        top = rng.integers(0, photo.shape[0] - size + 1)
        left = rng.integers(0, photo.shape[1] - size + 1)
        crops.append({"image": np.ascontiguousarray(photo[top : top + size, left : left + size])})
    spec = DatasetSpec(name="skimage_photos", split="+".join(names), privacy="public")
    return Source(crops, spec, ["image"])


def all_images(source: Source) -> jnp.ndarray:
    return jnp.asarray(to_float(source.get_batch(np.arange(len(source)))["image"]))


def coarse_ceiling(images: jnp.ndarray, config: tok.TokenizerConfig) -> float:
    """PSNR of the true coarse-only image against the image (what any coarse decode can reach)."""
    pyramid = wavelets.decompose(images, config.levels, config.wavelet, config.mode)
    coarse = wavelets.reconstruct(wavelets.coarse_only(pyramid))
    return float(tok.psnr(jnp.mean((jnp.clip(coarse, -1, 1) - images) ** 2)))


def as_image_folder(source: Source, folder: Path) -> DatasetSpec:
    """Writes a source's images as PNGs into ``folder``: a public `image_folder` dataset the stage can read."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(source.get_batch(np.arange(len(source)))["image"]):
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(folder / f"{i:05d}.png")
    return DatasetSpec(name="image_folder", split="train", privacy="public", manual_dir=str(folder),
                       data_dir=str(folder.parent / "tfds"), override_private_default=True)


def run_one(name: str, train: DatasetSpec, test: Source, config: tok.TokenizerConfig, args: argparse.Namespace,
            workdir: Path) -> dict:
    settings = demo_settings()
    tokenizer = dataclasses.replace(settings.tokenizer, model=config, steps=args.steps, batch_size=args.batch_size,
                                    learning_rate=args.learning_rate)
    data = dataclasses.replace(settings.data, channels=config.channels,
                               specs={**settings.data.specs, "public": dataclasses.replace(
                                   train, resolution=config.image_size[0], channels=config.channels)})
    settings = dataclasses.replace(settings, seed=args.seed, tokenizer=tokenizer, data=data)
    model, seconds = train_stage(TOKENIZER, settings, workdir)
    images = all_images(test)
    quality = tok.reconstruction_psnr(model, images)
    return {
        "dataset": name,
        "update": config.codebook_update,
        "eval_images": len(test),
        "tokens_per_scale": "/".join(map(str, model.tokens_per_scale)),
        "steps": args.steps,
        "train_s": seconds,
        "steps_per_s": args.steps / seconds,
        "train_psnr": last_logged(workdir, TOKENIZER)["psnr"],
        "psnr_all": quality["all"],
        "psnr_coarse": quality["coarse"],
        "psnr_coarse_vs_images": quality["coarse_vs_images"],
        "coarse_ceiling": coarse_ceiling(images, config),
        "usage": "/".join(f"{u['fraction_used']:.2f}" for u in quality["usage"]),
        "perplexity": "/".join(f"{u['perplexity']:.0f}" for u in quality["usage"]),
        "config": dataclasses.asdict(config),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=5e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--updates", default="ema,gradient", help="codebook update rules to compare")
    parser.add_argument("--datasets", default="mnist5k,photos")
    parser.add_argument("--photo-crops", type=int, default=1500, help="train crops (test: a third)")
    parser.add_argument("--out", default="/tmp/dpwave_bench/tokenizer.json")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="bench_tokenizer_"))
    data = {}
    for name in args.datasets.split(","):
        if name == "mnist5k":
            data[name] = (
                DatasetSpec(name="mnist5k", split="public", privacy="public", in_memory=True),
                load({"name": "mnist5k", "split": "test", "privacy": "public", "in_memory": True}),
                tok.TokenizerConfig(image_size=(32, 32), channels=1),
            )
        elif name == "photos":
            data[name] = (
                as_image_folder(photo_patches(TRAIN_PHOTOS, args.photo_crops, seed=args.seed), root / "photos"),
                photo_patches(TEST_PHOTOS, args.photo_crops // 3, seed=args.seed + 1),
                tok.TokenizerConfig(image_size=(32, 32), channels=3),
            )
        else:
            parser.error(f"unknown dataset {name!r}: use mnist5k and/or photos")
    rows = []
    for name, (train, test, config) in data.items():
        for update in args.updates.split(","):
            rows.append(run_one(name, train, test, dataclasses.replace(config, codebook_update=update), args,
                                root / f"{name}_{update}"))
    print_table(rows, [c for c in rows[0] if c != "config"])
    write_json(args.out, "tokenizer", rows, args=vars(args))


if __name__ == "__main__":
    main()
