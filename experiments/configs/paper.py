"""The paper-scale setup shared by mm_celeba_hq.py and coco.py: caption-conditioned 256x256, Haar with 3 levels.

`paper_config` writes the full-scale model and schedule once; `smoke` then shrinks every size (and nothing else)
in one block at the end, so the smoke run takes the identical code path at 32x32 in seconds.
"""

from __future__ import annotations

import math
import os

import ml_collections

from experiments.configs import common, recipes

PAPER_METHODS = (*common.METHODS, "nonprivate")


def parse_args(arg: str | None) -> ml_collections.ConfigDict:
    """Parses and checks the `:arg` of a paper-scale config."""
    args = common.parse_arg(arg, method="dpwave", epsilon="", seed=0, smoke=False, manual_dir="", data_dir="",
                            inception_weights="")
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


def dataset(args: ml_collections.ConfigDict, name: str, subdir: str, split: str, privacy: str,
            override_private_default: bool = False) -> dict:
    """A role whose raw release is `<manual_dir>/<subdir>` (the run sets resolution and channels)."""
    return dict(name=name, split=split, privacy=privacy, override_private_default=override_private_default,
                manual_dir=os.path.join(args.manual_dir, subdir) if args.manual_dir else None,
                data_dir=args.data_dir or (os.path.join(args.manual_dir, "tfds") if args.smoke else None))


def paper_config(args: ml_collections.ConfigDict, *, datasets: dict[str, dict], private_size: int, delta: float,
                 dp_steps: int, pretrain_steps: int, num_real: int) -> ml_collections.ConfigDict:
    """The setup of both paper tables, locked: `datasets` maps public/private/heldout/test to `dataset(...)`;
    the keyword sizes are the values that differ between the two. The base is locked first, so setting a key it
    lacks fails here instead of silently adding it."""
    c = common.base_config()
    c.lock()
    c.seed = args.seed
    c.method = args.method
    c.data.update(image_size=256, channels=3, condition="caption")
    for role, spec in datasets.items():
        c.data[role].update(spec)
    c.wavelet.update(name="haar", levels=3, mode="symmetric")  # 256 -> coarse 32x32x3
    c.tokenizer.model.update(patch_sizes=(2, 2, 4, 8), codebook_size=4096, code_dim=16, width=256, depth=4)
    c.tokenizer.update(steps=100_000, batch_size=256, learning_rate=1e-4)
    # ~0.3B parameters over the coarse tokens and the caption's first 128 UTF-8 bytes.
    # Its 24 blocks unrolled: on XLA:CPU's buffer assignment (bench_paper_step, microbatch 16) the scanned blocks
    # (transformer.scan_blocks) compile the DP step in 18 s instead of 88 s but need 42.9 GB per device, not 32.1.
    c.transformer.update(width=1024, depth=24, num_heads=16, mlp_dim=4096, max_text_len=128, dtype="bfloat16")
    c.pretrain.update(steps=pretrain_steps, batch_size=512, learning_rate=3e-4)
    c.dp.mechanism.update(target_epsilon=common.epsilon_value(args.epsilon), delta=delta, steps=dp_steps)
    # The default recipe at batch 4,096 (its learning-rate rule reads q = 4,096 / N and sigma); measured at CPU
    # scale only (docs/tuning.md): re-tune on a public stand-in before trusting it at 0.3B.
    recipes.apply(c, recipes.DEFAULT, private_size, expected_batch_size=4096)
    # 16 decode threads, 16 steps ahead (a thread makes a whole step's batch): the tokenizer and refiner decode 256
    # images of 256x256 RGB per step, and the up-front token encoding of the private set decodes every image once
    # (~630 images/s per thread in experiments/bench/bench_input.py). AR pretraining and DP steps gather tokens.
    c.perf.update(microbatch_size=16, input_workers=16, input_prefetch=16)
    c.refiner.model.update(widths=(256, 192, 128), num_blocks=4, objective="flow", sample_steps=20, cond_noise=0.05)
    c.refiner.update(steps=200_000, batch_size=256, learning_rate=2e-4)
    c.sample.update(num_samples=num_real, batch_size=250, guidance_scale=3.0, prompts="heldout")
    c.eval.update(num_real=num_real, inception_weights=args.inception_weights or None)
    c.checkpoint.update(every_steps=1000, max_to_keep=2)
    c.log_every_steps = 100
    if args.smoke:  # the same code path on a fixture tree: every size tiny, nothing else changed
        c.data.image_size = 32
        c.tokenizer.model.update(patch_sizes=(1, 1, 2, 4), codebook_size=16, code_dim=4, width=8, depth=1)
        c.tokenizer.update(steps=2, batch_size=4)
        c.transformer.update(width=16, depth=1, num_heads=2, mlp_dim=32, max_text_len=32, dtype="float32")
        c.pretrain.update(steps=2, batch_size=4)
        c.dp.mechanism.update(expected_batch_size=4, steps=2)
        c.perf.microbatch_size = 2
        c.refiner.model.update(widths=(8, 8, 8), num_blocks=1, sample_steps=2)
        c.refiner.update(steps=2, batch_size=4)
        c.sample.update(num_samples=4, batch_size=4)
        c.eval.update(feature_epochs=1, downstream_epochs=1, num_real=4)
        c.checkpoint.update(every_steps=1, max_to_keep=1)
        c.log_every_steps = 1
    return c
