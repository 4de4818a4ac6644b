r"""Text-to-image on MS-COCO 2017 captions at 256x256 under DP (the paper's COCO table).

Paper row: Bayrooti et al. 2026 (arXiv 2602.23262), MS-COCO 256x256, caption-conditioned. The model
and the `:arg` variants are those of mm_celeba_hq.py (shared code: experiments/configs/paper.py); only
the data and the DP schedule differ.

Variants (`:arg`, comma-separated): method=dpwave|full_dp|bicubic|nonprivate (nonprivate = full_dp at
epsilon inf), epsilon=1|10|inf|public (default 1; public: the public-only control, no DP stage), seed=K,
manual_dir=DIR (raw releases: DIR/coco/ in the
official COCO 2017 layout, see dpwave/data/builders/coco_captions.py, and DIR/cc3m/), data_dir=DIR,
inception_weights=FILE, and `smoke` (the identical code path at 32x32 on a fixture tree written by
tests/fixtures.py; not a result). delta = 1e-6 (< 1/118,287).

Data and the privacy boundary:
  private  coco_captions `train` (train2017: 118,287 images, ~5 captions each; captions private too).
  public   Conceptual Captions 3M (Sharma et al. 2018: web images with their alt-text captions) as
           `image_folder` at DIR/cc3m/: one flat folder of images with captions.jsonl. It trains the
           tokenizer, the refiner and the AR pretraining. Chosen because it is caption-paired like
           COCO, large enough to pretrain a 0.3B model, and not built from COCO (web alt-text pages,
           not the Flickr photos COCO annotated). A web crawl can still hold copies of COCO photos:
           drop near-duplicates of train2017 from the folder (e.g. by perceptual hash) before use;
           dpwave refuses only exact pixel copies at run start (dpwave/data/overlap.py).
  heldout  coco_captions `validation[:20%]` (1,000 val2017 images, outside DP training): memorization
           reference; its captions are the sampling prompts (sample.prompts = "heldout").
  test     coco_captions `validation[20%:]` (4,000): the FID / precision / recall reference.

Commands (`python -m experiments.reproduce --table coco_paper --workdir DIR --extra-args
manual_dir=/data/raw` runs all five rows and writes the table):
  python -m dpwave.main --config=experiments/configs/coco.py:method=dpwave,epsilon=1,manual_dir=/data/raw \
      --workdir=/runs/coco/dpwave_eps1
  python -m dpwave.main --config=experiments/configs/coco.py:method=dpwave,epsilon=10,manual_dir=/data/raw \
      --workdir=/runs/coco/dpwave_eps10
  python -m dpwave.main --config=experiments/configs/coco.py:method=full_dp,epsilon=1,manual_dir=/data/raw \
      --workdir=/runs/coco/full_dp_eps1
  python -m dpwave.main --config=experiments/configs/coco.py:method=full_dp,epsilon=10,manual_dir=/data/raw \
      --workdir=/runs/coco/full_dp_eps10
  python -m dpwave.main --config=experiments/configs/coco.py:method=nonprivate,manual_dir=/data/raw \
      --workdir=/runs/coco/nonprivate
  smoke: python -m dpwave.main --config=experiments/configs/coco.py:smoke,manual_dir=/tmp/fixture --workdir=/tmp/smoke
On a cluster: `sbatch --nodes=1 launch/slurm.sbatch --config=... --workdir=...` (8 GPUs), or
`launch/tpu_vm.sh --name=NAME --zone=ZONE --config=... --workdir=gs://...` (TPU v5e-64).

Sized for: one node of 8x H100 80GB (or a TPU v5e-64 slice); models as in mm_celeba_hq.py (~0.3B
transformer, width 1024, depth 24). DP: expected batch 4096 (q = 0.035), 2,000 steps (~69 epochs).
AR pretraining: 200k steps of 512 on CC3M (~31 epochs).
Expected cost (estimated, not measured: 6 x params x tokens at 40% of bf16 peak): AR pretraining
~8 h (dpwave) / ~24 h (full_dp), DP finetuning ~1 h (dpwave) / ~3 h (full_dp); tokenizer and refiner
as for MM-CelebA-HQ; about two days per row, less when rows share the public stages (as for
MM-CelebA-HQ: `experiments.reproduce` copies them between rows with equal inputs, or copy a finished row's
tokenizer/, pretrain/ and refiner/ into the new workdir by hand).

Expected result: no COCO number is recorded here as an anchor. The paper's claim to check: at equal
epsilon, dpwave has lower FID than full_dp, and the gap shrinks towards the non-private reference
as epsilon grows. Not run on this machine (no COCO, no GPU).
"""

from __future__ import annotations

import ml_collections

from experiments.configs import paper

PRIVATE_SUBDIR = "coco"
PUBLIC_SUBDIR = "cc3m"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = paper.parse_args(arg)
    datasets = {
        "private": paper.dataset(args, "coco_captions", PRIVATE_SUBDIR, "train", "private"),
        # image_folder splits are private by default: the override asserts CC3M is public.
        "public": paper.dataset(args, "image_folder", PUBLIC_SUBDIR, "train", "public", override_private_default=True),
        "heldout": paper.dataset(args, "coco_captions", PRIVATE_SUBDIR, "validation[:20%]", "public"),
        "test": paper.dataset(args, "coco_captions", PRIVATE_SUBDIR, "validation[20%:]", "public"),
    }
    return paper.paper_config(args, datasets=datasets, private_size=118_287, delta=1e-6, dp_steps=2000,
                              pretrain_steps=200_000, num_real=4000)
