"""The last two stages: sampling from the trained pipeline, and evaluating the samples.

`sample` writes `sample/samples.npz` (uint8 images, their prompts) and the demo grid `samples.png`
(real / real coarse / refined from the real coarse / generated coarse / generated). Prompts are
public: balanced class labels, or captions of the held-out split; never the private set's.
`evaluate` writes `metrics.json`, `report.md` and `privacy_statement.txt` in the workdir.
"""

from __future__ import annotations

import hashlib
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from dpwave import data, evaluate, files, grids, privacy, sample, wavelets
from dpwave.models import transformer as transformer_lib
from dpwave.models.text import encode_captions
from dpwave.train import builders, dp_recipe, loop, public_stages
from dpwave.train.dp_stage import final_transformer_params

GRID_COLUMNS = 10


def _refiner(config: ml_collections.ConfigDict, refiner_dir: str):
    graphdef, params = public_stages.init_refiner(config)
    optimizer = public_stages.refiner_lib.make_optimizer(config.refiner.learning_rate, max(config.refiner.steps, 1))
    state = public_stages.restore_params(refiner_dir, public_stages.steps.TrainState(params, optimizer.init(params)))
    return nnx.merge(graphdef, state.params)


def transformer_params(config: ml_collections.ConfigDict, dirs: dict[str, str]) -> tuple[nnx.GraphDef, nnx.State]:
    """The AR model to sample: the DP stage's parameters (their EMA with dp.ema_decay), or the pretrained ones
    in the public-only control."""
    if dp_recipe.public_only(config):
        graphdef, params = public_stages.init_pretrain(config)[:2]
        return graphdef, public_stages.restore_params(dirs["pretrain"], params).params
    graphdef, _ = public_stages.init_transformer(config, finetune=True)
    return graphdef, final_transformer_params(config, dirs["dp_finetune"])


def build_generator(config: ml_collections.ConfigDict, dirs: dict[str, str]) -> sample.Generator:
    tokenizer = public_stages.load_tokenizer(config, dirs["tokenizer"])
    transformer = nnx.merge(*transformer_params(config, dirs))
    refiner = _refiner(config, dirs["refiner"]) if config.method == "dpwave" else None
    s = config.sample
    return sample.make_generator(config.method, tokenizer, transformer, refiner, temperature=s.temperature,
                                 top_k=s.top_k or None, top_p=s.top_p, guidance_scale=s.guidance_scale)


def prompts(config: ml_collections.ConfigDict) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    """(conditions for the AR model, labels of the samples or None, where the prompts came from)."""
    n = config.sample.num_samples
    if config.data.condition == "label":
        labels = np.arange(n, dtype=np.int32) % config.data.num_classes
        return labels, labels, "balanced class labels (public: the class names)"
    if config.data.condition == "caption":
        if config.sample.prompts != "heldout":
            raise ValueError(f"caption prompts must come from the held-out split (sample.prompts='heldout'), "
                             f"got {config.sample.prompts!r}; the private set's captions are private")
        source = builders.load(config, "heldout")
        captions = [str(c) for c in source.get_batch(np.arange(n) % len(source))["caption"]]
        return encode_captions(captions, config.transformer.max_text_len), None, \
            f"captions of the held-out split {source.spec.label}"
    return None, None, "none (unconditional)"


def _real_rows(config: ml_collections.ConfigDict, generator: sample.Generator, key: jax.Array) -> dict[str, np.ndarray]:
    """Real test images, their coarse images and the refiner's output from their coarse band."""
    test = builders.load(config, "test")
    real = test.get_batch(np.linspace(0, len(test) - 1, GRID_COLUMNS).astype(int))  # spread over the classes
    x = jnp.asarray(data.to_float(real["image"]))
    levels, wavelet, mode = config.wavelet.levels, config.wavelet.name, config.wavelet.mode
    pyramid = wavelets.decompose(x, levels, wavelet, mode)
    rows = {"real": data.to_uint8(x),
            "real coarse": data.to_uint8(wavelets.upsample_coarse(pyramid.coarse, levels, x.shape[1:3], wavelet,
                                                                  method="nearest"))}
    if generator.refiner is not None:
        label = jnp.asarray(real["label"], jnp.int32) if generator.refiner.config.num_classes else None
        refined = sample.refine_coarse(generator.refiner.module(), pyramid.coarse, key, label)
        rows["refined (real coarse)"] = data.to_uint8(jnp.clip(wavelets.reconstruct(refined), -1, 1))
    return rows


def sample_stage(config: ml_collections.ConfigDict, workdir: str, dirs: dict[str, str], *, inputs_sha256: str) -> None:
    start = time.time()
    generator = build_generator(config, dirs)
    conds, labels, source = prompts(config)
    key = public_stages.stage_key(config, "sample")
    out = sample.generate_many(generator, conds, key, config.sample.batch_size,
                               num_samples=None if conds is not None else config.sample.num_samples)
    stage_dir = dirs["sample"]
    arrays = {"images": out["images"], "coarse_images": out["coarse_images"]}
    if labels is not None:
        arrays["labels"] = labels
    files.write_npz(os.path.join(stage_dir, "samples.npz"), arrays, compressed=True)
    rows = _real_rows(config, generator, jax.random.fold_in(key, 10**6))
    rows["generated coarse"] = out["coarse_images"][:GRID_COLUMNS]
    if "unrefined" in out:
        rows["generated, bicubic"] = out["unrefined"][:GRID_COLUMNS]
    rows["generated"] = out["images"][:GRID_COLUMNS]
    grids.sample_grid(rows, os.path.join(workdir, "samples.png"), GRID_COLUMNS)
    loop.write_json_atomic(os.path.join(stage_dir, loop.SUMMARY), {
        "stage": "sample", "num_samples": int(len(out["images"])), "wall_time_s": round(time.time() - start, 3),
        "samples_sha256": hashlib.sha256(out["images"].tobytes()).hexdigest(), "prompts": source,
        "method": config.method, "inputs_sha256": inputs_sha256})


def dp_step_flops(config: ml_collections.ConfigDict) -> float | None:
    """Model FLOPs of one DP step at the expected batch size: forward + backward (gradients of the trainable
    parameters only) of the per-example loss (XLA cost analysis) times the expected batch size; clipping and
    noise are not counted. None for the public-only control (no DP stage)."""
    if dp_recipe.public_only(config):
        return None
    graphdef, params = public_stages.init_transformer(config, finetune=True)
    params, frozen = privacy.partition(params, transformer_lib.trainable_mask(params, config.dp.trainable))
    cfg = nnx.merge(graphdef, params).config
    example = {"tokens": jnp.zeros((cfg.seq_len,), jnp.int32)}
    if cfg.conditioning == "class":
        example["label"] = jnp.zeros((), jnp.int32)
    elif cfg.conditioning == "text":
        example["caption_bytes"] = jnp.zeros((cfg.max_text_len,), jnp.int32)
    grad = jax.jit(jax.grad(lambda p, e: transformer_lib.per_example_loss(
        graphdef, privacy.combine(p, frozen), e, jax.random.key(0))))
    cost = grad.lower(params, example).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"]) * config.dp.expected_batch_size


# What the evaluate stage reads from the DP stage's summary, for the public-only control (no DP stage).
PUBLIC_ONLY_SUMMARY = {
    "epsilon": 0.0, "delta": 0.0, "noise_multiplier": None, "steps": 0, "wall_time_s": 0.0, "ledger": None,
    "statement": "(0, 0)-differential privacy: public-only control (dp.target_epsilon = 0).\n"
                 "  No DP stage ran and no private data was read: the samples come from the model pretrained on "
                 "public data."}


def _images(source: data.Source, limit: int | None = None) -> dict[str, np.ndarray]:
    n = len(source) if limit is None else min(limit, len(source))
    return source.get_batch(np.arange(n))


def evaluate_stage(config: ml_collections.ConfigDict, workdir: str, dirs: dict[str, str], *,
                   inputs_sha256: str) -> None:
    start = time.time()
    samples = files.read_npz(os.path.join(dirs["sample"], "samples.npz"))
    test = _images(builders.load(config, "test"), config.eval.num_real)
    heldout = _images(builders.load(config, "heldout"))
    # The memorization check is an operator-side audit: it reads the private images (not their labels),
    # and its output is not differentially private (see report.md).
    # The public-only control never opens the private split.
    private = None if dp_recipe.public_only(config) else _images(builders.load(config, "private"))["image"]
    labeled = config.data.condition == "label"
    report = evaluate.evaluate_samples(
        samples["images"], samples.get("labels"),
        # Caption datasets have no labels: only label-free metrics (FID with Inception weights); the
        # label-based ones come back None with a reason.
        real_test=(test["image"], test["label"] if labeled else np.zeros(len(test["image"]), np.int32)),
        heldout=(heldout["image"], heldout["label"]) if labeled else None,
        private_train=private, num_classes=config.data.num_classes or None,
        inception_weights=config.eval.inception_weights or None,
        classifier=evaluate.train_feature_classifier(
            (heldout["image"], heldout["label"]), num_classes=config.data.num_classes,
            config=evaluate.TrainConfig(epochs=config.eval.feature_epochs, seed=0)) if labeled else None,
        downstream_config=evaluate.TrainConfig(epochs=config.eval.downstream_epochs, seed=config.seed))
    mode = "public_only" if dp_recipe.public_only(config) else "tuning" if config.dp.tuning else "dp"
    dp = PUBLIC_ONLY_SUMMARY if mode == "public_only" else loop.read_summary(dirs["dp_finetune"])
    metrics = {m: report[m] for m in evaluate.METRICS}
    reasons = dict(report["reasons"])
    epsilon = dp["epsilon"] if isinstance(dp["epsilon"], float) else None  # "Infinity" for sigma = 0
    if epsilon is None:
        reasons["epsilon"] = "non-private reference run (no noise): epsilon is infinite"
    if mode == "public_only":
        reasons.update(memorization_ratio="public-only control: the private split is never read",
                       dp_step_flops="public-only control: no DP stage")
    elif mode == "tuning":
        dp = {**dp, "statement": dp_recipe.tuning_banner(config, builders.dataset_spec(config, "private").label,
                                                         len(private)) + dp["statement"]}
        epsilon, reasons["epsilon"] = None, "tuning run on public data (dp.tuning): no privacy claim"
        metrics["memorization_ratio"] = None  # the stand-in may be the heldout reference itself
        reasons["memorization_ratio"] = "tuning run: its DP input is public, there is nothing private to memorize"
    metrics.update(
        epsilon=epsilon, delta=dp["delta"], target_epsilon=config.dp.target_epsilon
        if np.isfinite(config.dp.target_epsilon) else None, noise_multiplier=dp["noise_multiplier"],
        dp_steps=dp["steps"], dp_step_flops=dp_step_flops(config),
        method=config.method, seed=config.seed, reasons=reasons, names=report["names"],
        privacy_ledger=dp["ledger"], details=report["details"])
    metrics["mode"] = mode
    loop.write_json_atomic(os.path.join(workdir, "metrics.json"), metrics)
    statement = dp["statement"] + f"\n  sampling prompts: {loop.read_summary(dirs['sample'])['prompts']}\n"
    files.write_text(os.path.join(workdir, "privacy_statement.txt"), statement)
    files.write_text(os.path.join(workdir, "report.md"), report_markdown(config, workdir, metrics, report, statement))
    loop.write_json_atomic(os.path.join(dirs["evaluate"], loop.SUMMARY),
                           {"stage": "evaluate", "wall_time_s": round(time.time() - start, 3),
                            "inputs_sha256": inputs_sha256})


def report_markdown(config: ml_collections.ConfigDict, workdir: str, metrics: dict, report: dict,
                    statement: str) -> str:
    """A short human-readable report of the run."""
    eps = {"public_only": "0 (public-only control)", "tuning": "n/a (tuning run on public data)"}.get(
        metrics["mode"], "inf (non-private reference)" if metrics["epsilon"] is None else f"{metrics['epsilon']:.3f}")
    lines = [f"# dpwave run: {config.method}, epsilon {eps}, seed {config.seed}", "",
             f"Workdir: `{workdir}`. Samples: `samples.png` (rows: real, real coarse, refined from the real coarse "
             "band where a refiner exists, generated coarse, generated).", "", "| metric | value |", "|---|---|"]
    for name in evaluate.METRICS:
        value = metrics[name]
        shown = f"{value:.4f}" if value is not None else f"n/a: {metrics['reasons'].get(name, '')}"
        lines.append(f"| {report['names'][name]} | {shown} |")
    walls = [f"{name} {summary['wall_time_s']:.0f}" for name in ("tokenizer", "pretrain", "refiner", "sample")
             if (summary := loop.read_summary(os.path.join(workdir, name)))]
    lines += [f"| DP steps | {metrics['dp_steps']} |",
              f"| model FLOPs per DP step (expected batch) | {metrics['dp_step_flops'] or 0:.3g} |", "",
              f"Stage wall times (s): {', '.join(walls)}; the DP stage's is left out (it depends on the Poisson "
              "draws: a timing side channel).", "",
              "## Privacy", "", "```", statement.rstrip(), "```", "",
              ("The memorization ratio reads the private images at evaluation time: it is an audit for the data "
               "owner and is not covered by the guarantee above. " if metrics["mode"] == "dp" else "")
              + " ".join(report["notes"]), ""]
    return "\n".join(lines)
