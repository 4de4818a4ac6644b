"""Refiner benchmark: does wavelet-space super-resolution give sharp, faithful details?

    python -m experiments.bench.bench_refiner --out /tmp/bench_refiner.json

On mnist5k (train on the public split, 1,500 digits; evaluate on held-out `test` digits, 32x32x1,
levels=2 so the coarse band is 8x8; --levels 3 for 4x4), side by side in one run:
  (a) bicubic upsampling of the coarse image (no refiner),
  (b) the refiner net trained with plain L2 regression,
  (c) the refiner trained with conditional flow matching (the default design),
  (c') (c) trained with `cond_noise` (robustness to a quantized / decoded coarse band).
Columns: PSNR of the full image against the truth; sharpness per level = energy of the predicted
detail bands / energy of the true ones (1.0 ideal); PSNR when the coarse band is perturbed by Gaussian
noise (a stand-in for VQ-tokenizer error); training and sampling time. A second table sweeps the flow
model's Euler steps (1 step = its conditional-mean prediction). Training is the pipeline's own refiner
stage (dpwave/train/stages/refiner.py: its task, loop, checkpoints) on the settings of `mnist.py:demo`
with the refiner replaced; its time includes compilation and checkpoints.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpwave import wavelets as wv
from dpwave.data import DatasetSpec, load, to_float
from dpwave.models import refiner as rf
from dpwave.train.stages.refiner import STAGE as REFINER
from experiments.bench.common import demo_settings, last_logged, median_seconds, print_table, train_stage, write_json


def psnr(images: jax.Array, truth: jax.Array) -> float:
    """PSNR in dB of images in [-1, 1] (clipped) against the truth."""
    mse = float(jnp.mean(jnp.square(jnp.clip(images, -1.0, 1.0) - truth)))
    return float(10.0 * np.log10(4.0 / mse))


def evaluate(method: str, model: rf.Refiner | None, truth: wv.Pyramid, images: jax.Array,
             perturbed: jax.Array, key: jax.Array, sample_steps: int | None = None) -> dict:
    """Quality and sampling time of one method on one batch of held-out images."""
    levels, hw = truth.levels, truth.image_hw
    if model is None:
        run = jax.jit(lambda c: wv.upsample_coarse(c, levels, hw))
        pred_images = run(truth.coarse)
        pred = wv.decompose(pred_images, levels)
        noisy_images = run(perturbed)
    else:
        graphdef, params = nnx.split(model, nnx.Param)
        run = lambda c: rf.refine_fn(graphdef, params, c, key, sample_steps=sample_steps)
        pred = run(truth.coarse)
        pred_images = wv.reconstruct(pred)
        noisy_images = wv.reconstruct(run(perturbed))
    seconds = median_seconds(lambda: run(truth.coarse), repeats=3)
    row = {"method": method, "psnr_db": psnr(pred_images, images)}
    for level, ratio in zip(range(levels, 0, -1), rf.detail_energy_ratio(pred, truth)):
        row[f"sharpness_L{level}"] = ratio
    row["psnr_perturbed_coarse_db"] = psnr(noisy_images, images)
    row["sample_ms_per_image"] = 1e3 * seconds / images.shape[0]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/bench_refiner.json")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--eval-count", type=int, default=500, help="held-out test digits to evaluate on")
    parser.add_argument("--coarse-noise", type=float, default=0.1,
                        help="std of the coarse-band perturbation, in pixel units of [-1, 1] images")
    parser.add_argument("--cond-noise", type=float, default=0.1, help="cond_noise of row (c')")
    parser.add_argument("--levels", type=int, default=2, help="wavelet levels (2: 8x8 coarse band, 3: 4x4)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    test = load(DatasetSpec("mnist5k", "test", "public", in_memory=True))
    images = jnp.asarray(to_float(test.get_batch(np.arange(min(args.eval_count, len(test))))["image"]))
    base = rf.RefinerConfig(image_size=32, channels=1, levels=args.levels, widths=(64,) * (args.levels - 1) + (32,))
    truth = wv.decompose(images, base.levels)
    gain = wv.band_gain(base.levels)
    key = jax.random.key(args.seed + 1)
    perturbed = truth.coarse + args.coarse_noise * gain * jax.random.normal(jax.random.key(99), truth.coarse.shape)

    variants = {
        "(b) regression": dataclasses.replace(base, objective="regression"),
        "(c) flow": base,
        f"(c') flow, cond_noise={args.cond_noise}": dataclasses.replace(base, cond_noise=args.cond_noise),
    }
    rows = [{**evaluate("(a) bicubic", None, truth, images, perturbed, key), "train_s": 0.0}]
    models = {}
    settings = demo_settings()
    settings = dataclasses.replace(settings, seed=args.seed, wavelet=dataclasses.replace(settings.wavelet,
                                                                                          levels=args.levels))
    root = Path(tempfile.mkdtemp(prefix="bench_refiner_"))
    for i, (name, config) in enumerate(variants.items()):
        refiner = dataclasses.replace(settings.refiner, model=config, steps=args.steps, batch_size=args.batch_size,
                                      learning_rate=args.learning_rate)
        model, train_s = train_stage(REFINER, dataclasses.replace(settings, refiner=refiner), root / str(i))
        models[name] = model
        rows.append({**evaluate(name, model, truth, images, perturbed, key), "train_s": train_s,
                     "final_loss": last_logged(root / str(i), REFINER)["loss"]})
    print_table(rows)

    sweep = []
    flow = models["(c) flow"]
    for steps in (1, 2, 4, 10, 20):
        sweep.append(evaluate(f"(c) flow, {steps} Euler steps", flow, truth, images, perturbed, key, steps))
    print_table(sweep)
    write_json(args.out, "refiner", rows, sample_steps_sweep=sweep, args=vars(args),
               config=dataclasses.asdict(base))


if __name__ == "__main__":
    main()
