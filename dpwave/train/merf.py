"""What the DP-MERF methods' stages share: the space they embed (pixels for dp_merf, the coarse band in pixel
units for dpwave_merf), the random features (public: config.seed and the public split) and the chunked
per-example embedding sum."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpwave import data, generation, wavelets
from dpwave.models import merf_generator
from dpwave.privacy import mean_embedding
from dpwave.train import streams
from dpwave.train.settings import Settings

FEATURE_STREAM = 7  # folded into config.seed for the random frequencies
CHUNK = 256  # examples embedded at once


def coarse_space(settings: Settings) -> bool:
    """dpwave_merf embeds and generates the coarse band; dp_merf the images."""
    return settings.method == "dpwave_merf"


def out_shape(settings: Settings) -> tuple[int, int, int]:
    """(H, W, C) of what the generator produces."""
    d = settings.data
    side = d.image_size // 2 ** settings.wavelet.levels if coarse_space(settings) else d.image_size
    return side, side, d.channels


def num_classes(settings: Settings) -> int:
    """K of the class-conditional embedding: the label classes, or 1 for unconditional data."""
    return settings.data.num_classes or 1


def to_space(settings: Settings, images: jax.Array) -> jax.Array:
    """[-1, 1] float NHWC images -> what the method embeds: themselves, or their coarse band in pixel units."""
    if not coarse_space(settings):
        return images
    w = settings.wavelet
    return wavelets.coarse_image(images, w.levels, w.name, w.mode)


def from_space(settings: Settings, generated: jax.Array) -> jax.Array:
    """A generated coarse image (pixel units) -> the coarse band the refiner takes (band units)."""
    w = settings.wavelet
    return generated * wavelets.band_gain(w.levels, w.name)


def labels_of(settings: Settings, batch: dict[str, np.ndarray]) -> np.ndarray:
    return batch["label"].astype(np.int32) if settings.data.num_classes else np.zeros(len(batch["image"]), np.int32)


def space_batches(settings: Settings, source: data.Source):
    """(space rows, labels) of `source` in chunks of CHUNK, in order (the last chunk may be shorter)."""
    convert = jax.jit(functools.partial(to_space, settings))
    for start in range(0, len(source), CHUNK):
        batch = source.get_batch(np.arange(start, min(start + CHUNK, len(source))))
        yield convert(jnp.asarray(data.to_float(batch["image"]))), labels_of(settings, batch)


def features(settings: Settings) -> mean_embedding.RandomFeatures:
    """The random features: frequencies from config.seed, the length scale from config.merf or the median
    heuristic on (at most 1,000 of) the public split's rows in the method's space. Public."""
    m = settings.merf
    length_scale = m.length_scale
    if length_scale is None:
        public = settings.data.load("public")
        data.require_public(public, "the DP-MERF kernel's length scale")
        batch = public.get_batch(np.arange(min(1000, len(public))))
        rows = to_space(settings, jnp.asarray(data.to_float(batch["image"])))
        length_scale = mean_embedding.median_length_scale(np.asarray(rows))
    h, w, c = out_shape(settings)
    return mean_embedding.draw_features(streams.stage_key(settings.seed, FEATURE_STREAM), h * w * c,
                                        m.num_features, length_scale)


def embedding_sum(settings: Settings, feats: mean_embedding.RandomFeatures, source: data.Source) -> dict:
    """The per-example clipped sum of `mean_embedding.example_vectors` over `source` (no noise), chunk by chunk."""
    k, weight = num_classes(settings), settings.merf.count_weight

    @jax.jit
    def chunk_sum(frequencies, rows, labels):
        vectors = mean_embedding.example_vectors(mean_embedding.RandomFeatures(frequencies), rows, labels, k, weight)
        return mean_embedding.clipped_sum(vectors, jnp.ones(labels.shape[0], jnp.float32))

    total = None
    for rows, labels in space_batches(settings, source):
        part = chunk_sum(feats.frequencies, rows, jnp.asarray(labels))
        total = part if total is None else jax.tree.map(jnp.add, total, part)
    return total


def _generate(settings: Settings, graphdef: Any, params: Any, refiner: Any, labels: jax.Array,
              key: jax.Array) -> dict[str, jax.Array]:
    out = merf_generator.generate(graphdef, params, labels, jax.random.fold_in(key, 0))
    w, side = settings.wavelet, settings.data.image_size
    if not coarse_space(settings):
        coarse = wavelets.decompose(out, w.levels, w.name, w.mode).coarse
        images = {"images": out}
    else:
        coarse = from_space(settings, out)
        label = labels if refiner.config.num_classes is not None else None
        pyramid = generation.refine_coarse(refiner.module(), coarse, jax.random.fold_in(key, 1), label)
        images = {"images": wavelets.reconstruct(pyramid),
                  "unrefined": wavelets.upsample_coarse(coarse, w.levels, (side, side), w.name, method="bicubic")}
    images["coarse_images"] = wavelets.upsample_coarse(coarse, w.levels, (side, side), w.name, method="nearest")
    return {k: jnp.clip(v, -1.0, 1.0) for k, v in images.items()}


def generate_many(settings: Settings, graphdef: Any, params: Any, refiner: generation.Part | None, labels: np.ndarray,
                  key: jax.Array, batch_size: int) -> dict[str, np.ndarray]:
    """uint8 images of `labels` (one per label) from the fitted generator (and the refiner for dpwave_merf), in
    batches of `batch_size` (`generation.generate_batches`; codes with fold_in(key_b, 0), the refiner with 1)."""
    fn = jax.jit(functools.partial(_generate, settings, graphdef))
    return generation.generate_batches(lambda labels_b, key_b: fn(params, refiner, labels_b, key_b), labels, key,
                                   batch_size)
