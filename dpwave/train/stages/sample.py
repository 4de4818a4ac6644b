"""The sample stage: samples of the trained pipeline and the demo grid.

Writes `sample/samples.npz` (uint8 images, their prompts) and `samples.png` in the workdir (rows: real, real
coarse, refined from the real coarse where a refiner exists, generated coarse, generated). Prompts are public:
balanced class labels, or captions of the held-out split; never the private set's.
"""

from __future__ import annotations

import functools
import hashlib
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpwave import data, files, generation, grids, wavelets
from dpwave.models import pixel_flow
from dpwave.models.text import encode_captions
from dpwave.train import loop, merf
from dpwave.train.fingerprints import jsonable
from dpwave.train.settings import DIFFUSION, Settings
from dpwave.train.stages.base import Context, Stage
from dpwave.train.stages.dp_diffusion import STAGE as DP_DIFFUSION
from dpwave.train.stages.dp_finetune import STAGE as DP_FINETUNE
from dpwave.train.stages.generator import STAGE as GENERATOR
from dpwave.train.stages.pixel_pretrain import STAGE as PIXEL_PRETRAIN
from dpwave.train.stages.pretrain import STAGE as PRETRAIN
from dpwave.train.stages.refiner import STAGE as REFINER
from dpwave.train.stages.tokenizer import STAGE as TOKENIZER

GRID_COLUMNS = 10


def transformer_params(settings: Settings, dirs: dict[str, str]) -> tuple[nnx.GraphDef, nnx.State]:
    """The AR model to sample: the DP stage's parameters (their EMA with dp.recipe.ema_decay), or the pretrained ones in
    the public-only control."""
    if settings.public_only:
        return PRETRAIN.init(settings)[0], PRETRAIN.restore_params(settings, dirs[PRETRAIN.name])
    return DP_FINETUNE.init(settings)[0], DP_FINETUNE.restore_params(settings, dirs[DP_FINETUNE.name])


def build_generator(settings: Settings, dirs: dict[str, str]) -> generation.Generator:
    tokenizer = TOKENIZER.model(settings, dirs[TOKENIZER.name])
    transformer = nnx.merge(*transformer_params(settings, dirs))
    refiner = REFINER.model(settings, dirs[REFINER.name]) if settings.method == "dpwave" else None  # AR methods
    s = settings.sample
    return generation.make_generator(settings.method, tokenizer, transformer, refiner, temperature=s.temperature,
                                 top_k=s.top_k, top_p=s.top_p, guidance_scale=s.guidance_scale)


def prompts(settings: Settings) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    """(conditions for the AR model, labels of the samples or None, where the prompts came from)."""
    n, condition = settings.sample.num_samples, settings.data.condition
    if condition == "label":
        labels = np.arange(n, dtype=np.int32) % settings.data.num_classes
        return labels, labels, "balanced class labels (public: the class names)"
    if condition == "caption":
        if settings.sample.prompts != "heldout":
            raise ValueError(f"caption prompts must come from the held-out split (sample.prompts='heldout'), "
                             f"got {settings.sample.prompts!r}; the private set's captions are private")
        source = settings.data.load("heldout")
        captions = [str(c) for c in source.get_batch(np.arange(n) % len(source))["caption"]]
        return encode_captions(captions, settings.transformer.max_text_len), None, \
            f"captions of the held-out split {source.spec.label}"
    return None, None, "none (unconditional)"


def refiner_part(settings: Settings, dirs: dict[str, str]) -> generation.Part | None:
    """The refiner of the methods that have one (dpwave, dpwave_merf)."""
    if settings.method not in ("dpwave", "dpwave_merf"):
        return None
    return generation.Part.of(REFINER.model(settings, dirs[REFINER.name]))


def generate(settings: Settings, dirs: dict[str, str], conds: np.ndarray | None,
             key: jax.Array) -> dict[str, np.ndarray]:
    """uint8 `images`, `coarse_images` (and `unrefined` where a refiner adds the details) of the run's method."""
    s = settings.sample
    labels = conds if conds is not None else np.zeros(s.num_samples, np.int32)
    if settings.uses_merf:
        graphdef, params = GENERATOR.restore_params(settings, dirs[GENERATOR.name])
        return merf.generate_many(settings, graphdef, params, refiner_part(settings, dirs), labels, key,
                                  s.batch_size)
    if settings.method == DIFFUSION:
        graphdef, params = (
            (PIXEL_PRETRAIN.init(settings)[0], PIXEL_PRETRAIN.restore_params(settings, dirs[PIXEL_PRETRAIN.name]))
            if settings.public_only else DP_DIFFUSION.restore_params(settings, dirs[DP_DIFFUSION.name]))
        w = settings.wavelet
        side = settings.data.image_size

        @jax.jit
        def images(params, labels_b, key_b):
            out = pixel_flow.generate(graphdef, params, labels_b, key_b, s.guidance_scale)
            coarse = wavelets.decompose(out, w.levels, w.name, w.mode).coarse
            return {"images": out, "coarse_images": jnp.clip(
                wavelets.upsample_coarse(coarse, w.levels, (side, side), w.name, method="nearest"), -1.0, 1.0)}

        return generation.generate_batches(functools.partial(images, params), labels, key, s.batch_size)
    return generation.generate_many(build_generator(settings, dirs), conds, key, s.batch_size,
                                num_samples=None if conds is not None else s.num_samples)


def _real_rows(settings: Settings, refiner: generation.Part | None, key: jax.Array) -> dict[str, np.ndarray]:
    """Real test images, their coarse images and the refiner's output from their coarse band."""
    test = settings.data.load("test")
    real = test.get_batch(np.linspace(0, len(test) - 1, GRID_COLUMNS).astype(int))  # spread over the classes
    x = jnp.asarray(data.to_float(real["image"]))
    w = settings.wavelet
    pyramid = wavelets.decompose(x, w.levels, w.name, w.mode)
    rows = {"real": data.to_uint8(x),
            "real coarse": data.to_uint8(wavelets.upsample_coarse(pyramid.coarse, w.levels, x.shape[1:3], w.name,
                                                                  method="nearest"))}
    if refiner is not None:
        label = jnp.asarray(real["label"], jnp.int32) if refiner.config.num_classes else None
        refined = generation.refine_coarse(refiner.module(), pyramid.coarse, key, label)
        rows["refined (real coarse)"] = data.to_uint8(jnp.clip(wavelets.reconstruct(refined), -1, 1))
    return rows


class Sample(Stage):
    """Not public: it samples the DP stage's model (its result depends on the private data, through DP)."""

    name = "sample"
    public = False
    stream = 5
    consumes = ("tokenizer", "pretrain", "dp_finetune", "generator", "pixel_pretrain", "dp_diffusion", "refiner")

    def inputs(self, settings: Settings) -> dict[str, Any]:
        d = settings.data
        return {"seed": settings.seed, "method": settings.method, "sample": jsonable(settings.sample),
                "data": {"condition": d.condition, "num_classes": d.num_classes,
                         "heldout": jsonable(d.specs["heldout"]), "test": jsonable(d.specs["test"])}}

    def run(self, ctx: Context) -> bool:
        settings, stage_dir = ctx.settings, ctx.dir(self.name)
        dirs = {name: ctx.dir(name) for name in self.consumes}
        start = time.time()
        conds, labels, source = prompts(settings)
        key = self.key(settings)
        out = generate(settings, dirs, conds, key)
        arrays = {"images": out["images"], "coarse_images": out["coarse_images"]}
        if labels is not None:
            arrays["labels"] = labels
        files.write_npz(os.path.join(stage_dir, "samples.npz"), arrays, compressed=True)
        rows = _real_rows(settings, refiner_part(settings, dirs), jax.random.fold_in(key, 10**6))
        rows["generated coarse"] = out["coarse_images"][:GRID_COLUMNS]
        if "unrefined" in out:
            rows["generated, bicubic"] = out["unrefined"][:GRID_COLUMNS]
        rows["generated"] = out["images"][:GRID_COLUMNS]
        grids.sample_grid(rows, os.path.join(ctx.workdir, "samples.png"), GRID_COLUMNS)
        loop.write_summary(stage_dir, ctx.inputs[self.name], {
            "stage": self.name, "num_samples": len(out["images"]), "wall_time_s": round(time.time() - start, 3),
            "samples_sha256": hashlib.sha256(out["images"].tobytes()).hexdigest(), "prompts": source,
            "method": settings.method})
        return True


STAGE = Sample()
