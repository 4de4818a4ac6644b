r"""Text-to-face on MM-CelebA-HQ at 256x256 under DP (the paper's MM-CelebA-HQ table).

Paper row: Bayrooti et al. 2026 (arXiv 2602.23262), MM-CelebA-HQ 256x256, caption-conditioned.
Anchors recorded from the paper: SPTI reports FID 33.27 at epsilon 1, against 57.01 for the DP
finetuning baselines.

Variants (`:arg`, comma-separated):
  method=dpwave|full_dp|bicubic|nonprivate   dpwave (default): DP only on the coarse 32x32 band;
      full_dp: the same AR family over the tokens of all scales, all DP-finetuned (the baseline);
      nonprivate: full_dp at epsilon inf, the non-private reference.
  epsilon=1|10|inf|public  target epsilon (default 1; inf for nonprivate; public: the public-only control,
      no DP stage, nothing trains on private data). delta = 1e-5 (< 1/24,000).
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
  python -m dpwave.main --config=experiments/configs/mm_celeba_hq.py:method=dpwave,epsilon=1,manual_dir=/data/raw \
      --workdir=/runs/celeba/dpwave_eps1
  python -m dpwave.main --config=experiments/configs/mm_celeba_hq.py:method=dpwave,epsilon=10,manual_dir=/data/raw \
      --workdir=/runs/celeba/dpwave_eps10
  python -m dpwave.main --config=experiments/configs/mm_celeba_hq.py:method=full_dp,epsilon=1,manual_dir=/data/raw \
      --workdir=/runs/celeba/full_dp_eps1
  python -m dpwave.main --config=experiments/configs/mm_celeba_hq.py:method=full_dp,epsilon=10,manual_dir=/data/raw \
      --workdir=/runs/celeba/full_dp_eps10
  python -m dpwave.main --config=experiments/configs/mm_celeba_hq.py:method=nonprivate,manual_dir=/data/raw \
      --workdir=/runs/celeba/nonprivate
  smoke: python -m dpwave.main --config=experiments/configs/mm_celeba_hq.py:smoke,manual_dir=/tmp/fixture \
      --workdir=/tmp/smoke
On a cluster: `sbatch --nodes=1 launch/slurm.sbatch --config=... --workdir=...` (8 GPUs), or
`launch/tpu_vm.sh --name=NAME --zone=ZONE --config=... --workdir=gs://...` (TPU v5e-64).

Sized for: one node of 8x H100 80GB (or a TPU v5e-64 slice). Models: Haar, 3 levels (256 -> coarse
32x32x3); tokenizer patches (2, 2, 4, 8) = 16x16 = 256 tokens per scale, 4096 codes per scale;
transformer width 1024, depth 24, 16 heads, MLP 4096 (~0.3B parameters, bfloat16 activations),
captions as their first 128 UTF-8 bytes; refiner: flow matching, widths (256, 192, 128) for levels
3..1; DP: expected batch 4096 (q = 0.17), 400 steps (~68 epochs), microbatches of 16 per device.
Expected cost (estimated, not measured: 6 x params x tokens at 40% of bf16 peak): AR pretraining
~2 h (dpwave, 256 tokens + caption) / ~6 h (full_dp, 1024 tokens), DP finetuning < 1 h; with the
tokenizer (100k steps) and refiner (200k steps) about one day per row. The public stages (tokenizer,
pretrain, refiner) are the same for every row of a method: `experiments.reproduce` trains them once and
copies them to the other rows; by hand, copy a finished row's tokenizer/, pretrain/ and refiner/ directories
into the new row's workdir before its first run (a copied stage is reused only if its inputs_sha256 equals
the new config's, and refused otherwise). `--config.<stage>.init_params_from=ROW_WORKDIR` instead starts a
stage from that row's parameters and trains its steps again (e.g. to pretrain longer).

Expected result: dpwave at epsilon 1 near the paper's SPTI row (FID ~33); full_dp at epsilon 1 near
the DP-finetuning baseline (FID ~57); epsilon 10 between its epsilon-1 row and the non-private
reference (no number recorded for it). Not run on this machine (no MM-CelebA-HQ, no GPU).
"""

from __future__ import annotations

import ml_collections

from experiments.configs import paper

PRIVATE_SUBDIR = "mm_celeba_hq"
PUBLIC_SUBDIR = "ffhq"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = paper.parse_args(arg)
    datasets = {
        "private": paper.dataset(args, "mm_celeba_hq", PRIVATE_SUBDIR, "train", "private"),
        # image_folder splits are private by default: the override asserts FFHQ is public.
        "public": paper.dataset(args, "image_folder", PUBLIC_SUBDIR, "train", "public", override_private_default=True),
        "heldout": paper.dataset(args, "mm_celeba_hq", PRIVATE_SUBDIR, "test[:20%]", "public"),
        "test": paper.dataset(args, "mm_celeba_hq", PRIVATE_SUBDIR, "test[20%:]", "public"),
    }
    return paper.paper_config(args, datasets=datasets, private_size=24_000, delta=1e-5, dp_steps=400,
                              pretrain_steps=50_000, num_real=4800)
