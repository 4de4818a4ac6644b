"""The evaluate stage: the samples' metrics and the run's report.

Writes `metrics.json`, `report.md` and `privacy_statement.txt` in the workdir.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpwave import data, evaluate, files, privacy
from dpwave.models import pixel_flow
from dpwave.models import transformer as transformer_lib
from dpwave.privacy import mean_embedding
from dpwave.train import dp_recipe, loop, merf
from dpwave.train.fingerprints import jsonable
from dpwave.train.settings import DIFFUSION, Settings
from dpwave.train.stages.base import Context, Stage
from dpwave.train.stages.dp_finetune import STAGE as DP_FINETUNE
from dpwave.train.stages.pixel_pretrain import STAGE as PIXEL_PRETRAIN
from dpwave.train.stages.sample import STAGE as SAMPLE

# What the evaluate stage reads from the DP stage's summary, for the public-only control (no DP stage).
PUBLIC_ONLY_SUMMARY = {
    "epsilon": 0.0, "delta": 0.0, "noise_multiplier": None, "steps": 0, "wall_time_s": 0.0, "ledger": None,
    "statement": "(0, 0)-differential privacy: public-only control (dp.mechanism.target_epsilon = 0).\n"
                 "  No DP stage ran and no model was trained on private data (the private split was opened only to "
                 "hash its pixels for the run-start content check): the samples come from models trained on public "
                 "data only."}

# The stages whose wall time the report shows (the DP stage's is a timing side channel).
PUBLIC_WALLS = ("tokenizer", "pretrain", "pixel_pretrain", "generator", "refiner", "sample")

# Why the conditioning accuracy is None in runs not prompted with class labels.
COND_REASONS = {
    "caption": "caption run: no caption dataset here (coco_captions, mm_celeba_hq, image_folder with captions) "
               "pairs its captions with a class label or attribute that a classifier could check samples against",
    "none": "unconditional run: the samples have no prompts to agree with"}


def _flops(fn: Any, *args: Any) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def release_flops(settings: Settings, dataset_size: int) -> float:
    """FLOPs of the DP-MERF release: one example's embedding (XLA cost analysis) times N; clipping and noise are
    not counted."""
    feats = mean_embedding.RandomFeatures(jnp.zeros((math.prod(merf.out_shape(settings)),
                                                     settings.merf.num_features // 2), jnp.float32))
    row = jnp.zeros((1, *merf.out_shape(settings)), jnp.float32)
    per_example = _flops(lambda x: mean_embedding.example_vectors(feats, x, jnp.zeros((1,), jnp.int32),
                                                                  merf.num_classes(settings),
                                                                  settings.merf.count_weight), row)
    return per_example * dataset_size


def dp_step_flops(settings: Settings, dp_summary: dict) -> float | None:
    """Model FLOPs of one DP step at the expected batch size: forward + backward (gradients of the trainable
    parameters only) of the per-example loss (XLA cost analysis) times the expected batch size; clipping and
    noise are not counted. The DP-MERF release is one step over the whole set (`release_flops`). None for the
    public-only control (no DP stage)."""
    if settings.public_only:
        return None
    if settings.uses_merf:
        return release_flops(settings, dp_summary["privacy"]["dataset_size"])
    if settings.method == DIFFUSION:
        graphdef, state, _ = PIXEL_PRETRAIN.init(settings)
        side = settings.data.image_size
        example = {"image": jnp.zeros((side, side, settings.data.channels)), "label": jnp.zeros((), jnp.int32)}
        grad = jax.grad(lambda p, e: pixel_flow.example_loss(graphdef, p, e, jax.random.key(0)))
        return _flops(grad, state.params, example) * settings.dp.mechanism.expected_batch_size
    graphdef, state = DP_FINETUNE.init(settings)
    params, frozen = privacy.partition(state.params,
                                       transformer_lib.trainable_mask(state.params, settings.dp.recipe.trainable))
    cfg = nnx.merge(graphdef, state.params).config
    example = {"tokens": jnp.zeros((cfg.seq_len,), jnp.int32)}
    if cfg.conditioning == "class":
        example["label"] = jnp.zeros((), jnp.int32)
    elif cfg.conditioning == "text":
        example["caption_bytes"] = jnp.zeros((cfg.max_text_len,), jnp.int32)
    key = jax.random.key(0)  # the FLOPs do not depend on the dropout draws
    grad = jax.grad(lambda p, e: transformer_lib.per_example_loss(graphdef, privacy.combine(p, frozen), e, key))
    return _flops(grad, params, example) * settings.dp.mechanism.expected_batch_size


def _images(source: data.Source, limit: int | None = None) -> dict[str, np.ndarray]:
    n = len(source) if limit is None else min(limit, len(source))
    return source.get_batch(np.arange(n))


def _sample_report(settings: Settings, samples: dict[str, np.ndarray]) -> tuple[dict, int | None]:
    """`evaluate.evaluate_samples` against the run's test, heldout and private images, and the number of private
    images read (None: the public-only control reads no private images here; it has no memorization check)."""
    d, ev = settings.data, settings.eval
    test = _images(d.load("test"), ev.num_real)
    heldout = _images(d.load("heldout"))
    # The memorization check is an operator-side audit: it reads the private images (not their labels), and its
    # output is not differentially private (see report.md).
    private = None if settings.public_only else _images(d.load("private"))["image"]
    labeled = d.condition == "label"
    report = evaluate.evaluate_samples(
        samples["images"], samples.get("labels"),
        # Caption datasets have no labels: only label-free metrics (FID with Inception weights); the label-based
        # ones come back None with a reason.
        real_test=(test["image"], test["label"] if labeled else np.zeros(len(test["image"]), np.int32)),
        heldout=(heldout["image"], heldout["label"]) if labeled else None,
        private_train=private, num_classes=d.num_classes, inception_weights=ev.inception_weights,
        classifier=evaluate.train_feature_classifier(
            (heldout["image"], heldout["label"]), num_classes=d.num_classes,
            config=evaluate.TrainConfig(epochs=ev.feature_epochs, seed=0)) if labeled else None,
        downstream_config=evaluate.TrainConfig(epochs=ev.downstream_epochs, seed=settings.seed))
    return report, None if private is None else len(private)


def report_markdown(settings: Settings, workdir: str, metrics: dict, report: dict, statement: str) -> str:
    """A short human-readable report of the run."""
    eps = {"public_only": "0 (public-only control)", "tuning": "n/a (tuning run on public data)"}.get(
        metrics["mode"], "inf (non-private reference)" if metrics["epsilon"] is None else f"{metrics['epsilon']:.3f}")
    lines = [f"# dpwave run: {settings.method}, epsilon {eps}, seed {settings.seed}", "",
             f"Workdir: `{workdir}`. Samples: `samples.png` (rows: real, real coarse, refined from the real coarse "
             "band where a refiner exists, generated coarse, generated).", "", "| metric | value |", "|---|---|"]
    for name in evaluate.METRICS:
        value = metrics[name]
        shown = f"{value:.4f}" if value is not None else f"n/a: {metrics['reasons'].get(name, '')}"
        lines.append(f"| {report['names'][name]} | {shown} |")
    per_class = evaluate.conditioning_line(metrics.get("details", {}))
    walls = [f"{name} {summary['wall_time_s']:.0f}" for name in PUBLIC_WALLS
             if (summary := loop.read_summary(os.path.join(workdir, name)))]
    lines += [f"| DP steps | {metrics['dp_steps']} |",
              f"| model FLOPs per DP step (expected batch) | {metrics['dp_step_flops'] or 0:.3g} |", "",
              *([per_class, ""] if per_class else []),
              f"Stage wall times (s): {', '.join(walls)}; the DP stage's is left out (it depends on the Poisson "
              "draws: a timing side channel).", "",
              "## Privacy", "", "```", statement.rstrip(), "```", "",
              ("The memorization ratio reads the private images at evaluation time: it is an audit for the data "
               "owner and is not covered by the guarantee above. " if metrics["mode"] == "dp" else "")
              + " ".join(report["notes"]), ""]
    return "\n".join(lines)


class Evaluate(Stage):
    """Not public: the memorization check reads the private images (an operator-side audit, not DP)."""

    name = "evaluate"
    public = False
    stream = None  # the metrics' own seeds: 0 for the FD-cls classifier (every run scored alike), config.seed
    consumes = ("sample", "dp_finetune", "dp_embedding", "dp_diffusion")

    def inputs(self, settings: Settings) -> dict[str, Any]:
        d, mechanism = settings.data, settings.dp.mechanism
        return {"seed": settings.seed, "eval": jsonable(settings.eval), "mode": settings.mode,
                "target_epsilon": jsonable(mechanism.target_epsilon),
                "data": {"condition": d.condition, "num_classes": d.num_classes,
                         **{role: jsonable(d.specs[role]) for role in ("private", "heldout", "test")}}}

    def run(self, ctx: Context) -> bool:
        settings, workdir, mode = ctx.settings, ctx.workdir, ctx.settings.mode
        start = time.time()
        samples = files.read_npz(os.path.join(ctx.dir(SAMPLE.name), "samples.npz"))
        report, num_private = _sample_report(settings, samples)
        dp = PUBLIC_ONLY_SUMMARY if mode == "public_only" else loop.read_summary(ctx.dir(next(  # the run's DP stage
            name for name in self.consumes if name in ctx.inputs and name != SAMPLE.name)))
        metrics = {m: report[m] for m in evaluate.METRICS}
        reasons = dict(report["reasons"])
        if settings.data.condition in COND_REASONS:
            reasons["cond_accuracy"] = COND_REASONS[settings.data.condition]
        epsilon = dp["epsilon"] if isinstance(dp["epsilon"], float) else None  # "Infinity" for sigma = 0
        if epsilon is None:
            reasons["epsilon"] = "non-private reference run (no noise): epsilon is infinite"
        if mode == "public_only":
            reasons.update(
                memorization_ratio="public-only control: no model was trained on private data, nothing to memorize",
                dp_step_flops="public-only control: no DP stage")
        elif mode == "tuning":
            dp = {**dp, "statement": dp_recipe.tuning_banner(settings, num_private) + dp["statement"]}
            epsilon, reasons["epsilon"] = None, "tuning run on public data (dp.mechanism.tuning): no privacy claim"
            metrics["memorization_ratio"] = None  # the stand-in may be the heldout reference itself
            reasons["memorization_ratio"] = "tuning run: its DP input is public, there is nothing private to memorize"
        target = settings.dp.mechanism.target_epsilon
        metrics.update(
            epsilon=epsilon, delta=dp["delta"], target_epsilon=target if math.isfinite(target) else None,
            noise_multiplier=dp["noise_multiplier"], dp_steps=dp["steps"], dp_step_flops=dp_step_flops(settings, dp),
            method=settings.method, seed=settings.seed, reasons=reasons, names=report["names"],
            privacy_ledger=dp["ledger"], details=report["details"])
        metrics["mode"] = mode
        loop.write_json_atomic(os.path.join(workdir, "metrics.json"), metrics)
        statement = dp["statement"] + f"\n  sampling prompts: {loop.read_summary(ctx.dir(SAMPLE.name))['prompts']}\n"
        files.write_text(os.path.join(workdir, "privacy_statement.txt"), statement)
        files.write_text(os.path.join(workdir, "report.md"),
                         report_markdown(settings, workdir, metrics, report, statement))
        loop.write_summary(ctx.dir(self.name), ctx.inputs[self.name],
                           {"stage": self.name, "wall_time_s": round(time.time() - start, 3)})
        return True


STAGE = Evaluate()
