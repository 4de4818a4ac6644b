r"""Text-to-face on MM-CelebA-HQ at 256x256 under DP (the paper's MM-CelebA-HQ table).

Paper row: Bayrooti et al. 2026 (arXiv 2602.23262), MM-CelebA-HQ 256x256, caption-conditioned.
Anchors recorded from the paper: SPTI reports FID 33.27 at epsilon 1, against 57.01 for the DP
finetuning baselines.

Variants (`:arg`, comma-separated):
  method=dpwave|full_dp|bicubic|nonprivate   dpwave (default): DP only on the coarse 32x32 band;
      full_dp: the same AR family over the tokens of all scales, all DP-finetuned (the baseline);
      nonprivate: full_dp at epsilon inf, the non-private reference.
  epsilon=1|10|inf|public  target epsilon (default 1; inf for nonprivate; public: the public-only control,
      no DP stage and no private data read). delta = 1e-5 (< 1/24,000).
  seed=K            the run's seed.
  manual_dir=DIR    root of the raw releases: DIR/mm_celeba_hq/ (the official MM-CelebA-HQ layout, see
      dpwave/data/builders/mm_celeba_hq.py) and DIR/ffhq/ (public faces, see below).
  data_dir=DIR      where TFDS datasets are prepared (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).
  inception_weights=FILE  InceptionV3 FID weights (.npz, dpwave/evaluate/convert_inception_weights.py);
      without them the report gives FID as null with the reason and the FD-cls surrogate instead.
  smoke             the identical code path on a tiny fixture tree: 32x32, few steps, tiny models
      (needs manual_dir; tests/fixtures.py writes such a tree). Not a result.

Data and the privacy boundary:
  private  mm_celeba_hq `train` (24,000 images with 10 captions each; their captions are private too).
  public   FFHQ (Karras et al. 2019: 70,000 Flickr faces) as `image_folder` at DIR/ffhq/: one flat
           folder of images (move the release's 00000/, 01000/, ... subfolders' files up, or they are
           read as classes) with captions.jsonl ({"file", "caption"} per line, e.g. from a public
           captioning model run on FFHQ). Trains the tokenizer, the refiner and the AR pretraining.
           Not CelebA: CelebA-HQ, hence MM-CelebA-HQ, is a subset of CelebA, so "public" CelebA would
           put the private images into non-DP training. FFHQ and CelebA-HQ share no images (Flickr
           vs. celebrity photos).
  heldout  mm_celeba_hq `test[:20%]` (1,200 images outside the DP training set): memorization
           reference, and its captions are the sampling prompts (sample.prompts = "heldout").
  test     mm_celeba_hq `test[20%:]` (4,800): the FID / precision / recall reference.

Commands (one table row each; `python -m experiments.reproduce --table celeba_paper --workdir DIR
--extra-args manual_dir=/data/raw` runs all five and writes the table):
  python -m dpwave.main --config=experiments/configs/mm_celeba_hq.py:method=dpwave,epsilon=1,manual_dir=/data/raw --workdir=/runs/celeba/dpwave_eps1
  python -m dpwave.main --config=experiments/configs/mm_celeba_hq.py:method=dpwave,epsilon=10,manual_dir=/data/raw --workdir=/runs/celeba/dpwave_eps10
  python -m dpwave.main --config=experiments/configs/mm_celeba_hq.py:method=full_dp,epsilon=1,manual_dir=/data/raw --workdir=/runs/celeba/full_dp_eps1
  python -m dpwave.main --config=experiments/configs/mm_celeba_hq.py:method=full_dp,epsilon=10,manual_dir=/data/raw --workdir=/runs/celeba/full_dp_eps10
  python -m dpwave.main --config=experiments/configs/mm_celeba_hq.py:method=nonprivate,manual_dir=/data/raw --workdir=/runs/celeba/nonprivate
  smoke: python -m dpwave.main --config=experiments/configs/mm_celeba_hq.py:smoke,manual_dir=/tmp/fixture --workdir=/tmp/smoke
On a cluster: `sbatch --nodes=1 launch/slurm.sbatch --config=... --workdir=...` (8 GPUs), or
`launch/tpu_vm.sh --name=NAME --zone=ZONE --config=... --workdir=gs://...` (TPU v5e-64).

Sized for: one node of 8x H100 80GB (or a TPU v5e-64 slice). Models: Haar, 3 levels (256 -> coarse
32x32x3); tokenizer patches (2, 2, 4, 8) = 16x16 = 256 tokens per scale, 4096 codes per scale;
transformer width 1024, depth 24, 16 heads, MLP 4096 (~0.3B parameters, bfloat16 activations),
captions as their first 128 UTF-8 bytes; refiner: flow matching, widths (256, 192, 128) for levels
3..1; DP: expected batch 4096 (q = 0.17), 400 steps (~68 epochs), microbatches of 16 per device.
Expected cost (estimated, not measured: 6 x params x tokens at 40% of bf16 peak): AR pretraining
~2 h (dpwave, 256 tokens + caption) / ~6 h (full_dp, 1024 tokens), DP finetuning < 1 h; with the
tokenizer (100k steps) and refiner (200k steps) about one day per row. The public stages are the
same for every row: reuse them with --config.tokenizer.init_from=, --config.refiner.init_from= and
--config.pretrain.init_from= (workdirs of a finished row).

Expected result: dpwave at epsilon 1 near the paper's SPTI row (FID ~33); full_dp at epsilon 1 near
the DP-finetuning baseline (FID ~57); epsilon 10 between its epsilon-1 row and the non-private
reference (no number recorded for it). Not run on this machine (no MM-CelebA-HQ, no GPU).
"""

from __future__ import annotations

import math
import os
from typing import Any

import ml_collections

from experiments.configs import common

PRIVATE_SUBDIR = "mm_celeba_hq"
PUBLIC_SUBDIR = "ffhq"
PAPER_METHODS = (*common.METHODS, "nonprivate")


def parse_paper_args(arg: str | None) -> ml_collections.ConfigDict:
    """Parses and checks the `:arg` of a paper-scale config (this file's and coco.py's)."""
    args = common.parse_arg(arg, method="dpwave", epsilon="", seed=0, smoke=False, manual_dir="",
                            data_dir="", inception_weights="")
    if "variant" in args:
        raise ValueError(f"unknown variant {args.variant!r} in {arg!r}; the only bare word is 'smoke' "
                         "(others are key=value: method, epsilon, seed, manual_dir, data_dir, "
                         "inception_weights)")
    if args.method not in PAPER_METHODS:
        raise ValueError(f"method={args.method!r}; use one of {PAPER_METHODS}")
    if args.method == "nonprivate":
        if args.epsilon and not math.isinf(common.epsilon_value(args.epsilon)):
            raise ValueError(f"method=nonprivate trains without DP but epsilon={args.epsilon}; drop "
                             "epsilon or use method=full_dp for a private run")
        args.method, args.epsilon = "full_dp", "inf"
    args.epsilon = args.epsilon or "1"
    epsilon = common.epsilon_value(args.epsilon)
    if not (epsilon > 0 or args.epsilon == "public"):
        raise ValueError(f"epsilon={args.epsilon!r} must be > 0 (or inf for the non-private reference, public for "
                         "the public-only control)")
    if args.smoke and not args.manual_dir:
        raise ValueError("smoke needs manual_dir=/path to a fixture tree (tests/fixtures.py: "
                         "write_smoke_tree)")
    for key in ("manual_dir", "data_dir"):
        if "," in args[key]:
            raise ValueError(f"{key}={args[key]!r} contains a comma, which ends an :arg value; use "
                             f"--config.data.<split>.{key}= instead")
    return args


def paper_dataset(args: ml_collections.ConfigDict, name: str, subdir: str, split: str, privacy: str,
                  **kw: Any) -> dict:
    """A dataset whose raw release is `<manual_dir>/<subdir>` (the run sets resolution and channels)."""
    spec = common.dataset(name, split, privacy, **kw)
    spec["manual_dir"] = os.path.join(args.manual_dir, subdir) if args.manual_dir else ""
    spec["data_dir"] = args.data_dir or (os.path.join(args.manual_dir, "tfds") if args.smoke else "")
    return spec


def paper_config(args: ml_collections.ConfigDict, *, datasets: dict[str, dict], delta: float,
                 dp_steps: int, pretrain_steps: int, num_real: int) -> ml_collections.ConfigDict:
    """The caption-conditioned 256x256 setup shared by the paper configs, locked.

    `datasets` maps public/private/heldout/test to specs; the keyword sizes are the full-scale values
    that differ between datasets (smoke replaces every size by a tiny one, and nothing else). The base
    config is locked first, so setting a key it lacks fails here instead of silently adding it.
    """
    c = common.base_config()
    c.lock()
    c.seed = args.seed
    c.method = args.method
    c.data.update(image_size=32 if args.smoke else 256, channels=3, num_classes=0, condition="caption")
    for role, spec in datasets.items():
        c.data[role].update(spec)
    c.wavelet.update(name="haar", levels=3, mode="symmetric")
    c.dp.update(target_epsilon=common.epsilon_value(args.epsilon), delta=delta)
    c.transformer.update(dropout=0.0, cond_dropout=0.1)
    c.refiner.model.update(objective="flow", cond_noise=0.05)
    c.sample.update(temperature=1.0, top_k=0, top_p=1.0, guidance_scale=3.0, prompts="heldout")
    c.eval.inception_weights = args.inception_weights
    if args.smoke:
        c.tokenizer.model.update(patch_sizes=(1, 1, 2, 4), codebook_size=16, code_dim=4, width=8, depth=1)
        c.tokenizer.update(steps=2, batch_size=4)
        c.transformer.update(width=16, depth=1, num_heads=2, mlp_dim=32, max_text_len=32,
                             dtype="float32")
        c.pretrain.update(steps=2, batch_size=4)
        c.dp.update(expected_batch_size=4, steps=2, microbatch_size=2)
        c.refiner.model.update(widths=(8, 8, 8), num_blocks=1, sample_steps=2)
        c.refiner.update(steps=2, batch_size=4)
        c.sample.update(num_samples=4, batch_size=4)
        c.eval.update(feature_epochs=1, downstream_epochs=1, num_real=4)
        c.checkpoint.update(every_steps=1, max_to_keep=1)
        c.log_every_steps = 1
    else:
        c.tokenizer.model.update(patch_sizes=(2, 2, 4, 8), codebook_size=4096, code_dim=16, width=256,
                                 depth=4)
        c.tokenizer.update(steps=100_000, batch_size=256, learning_rate=1e-4)
        c.transformer.update(width=1024, depth=24, num_heads=16, mlp_dim=4096, max_text_len=128,
                             dtype="bfloat16")
        c.pretrain.update(steps=pretrain_steps, batch_size=512, learning_rate=3e-4)
        c.dp.update(expected_batch_size=4096, steps=dp_steps, learning_rate=2e-4, microbatch_size=16)
        c.refiner.model.update(widths=(256, 192, 128), num_blocks=4, sample_steps=20)
        c.refiner.update(steps=200_000, batch_size=256, learning_rate=2e-4)
        c.sample.update(num_samples=num_real, batch_size=250)
        c.eval.num_real = num_real
        c.checkpoint.update(every_steps=1000, max_to_keep=2)
        c.log_every_steps = 100
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_paper_args(arg)
    datasets = {
        "private": paper_dataset(args, "mm_celeba_hq", PRIVATE_SUBDIR, "train", "private"),
        # image_folder splits are private by default: the override asserts FFHQ is public.
        "public": paper_dataset(args, "image_folder", PUBLIC_SUBDIR, "train", "public", override_private_default=True),
        "heldout": paper_dataset(args, "mm_celeba_hq", PRIVATE_SUBDIR, "test[:20%]", "public"),
        "test": paper_dataset(args, "mm_celeba_hq", PRIVATE_SUBDIR, "test[20%:]", "public"),
    }
    return paper_config(args, datasets=datasets, delta=1e-5, dp_steps=400, pretrain_steps=50_000,
                        num_real=4800)
