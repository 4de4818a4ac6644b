"""DP-MERF's release (Harder et al., AISTATS 2021): a class-conditional mean embedding of random Fourier
features, released once with the Gaussian mechanism.

Each example x (flattened) of class y contributes

    v(x, y) = {"embedding": a phi(x) e_y^T, "counts": b e_y},   phi(x) = [cos(W x), sin(W x)] / sqrt(F/2),

with F features (F/2 frequencies, the columns of W ~ N(0, 1 / length_scale^2)) and a^2 + b^2 = 1, so ||v|| = 1 in
exact arithmetic (cos^2 + sin^2 = 1). The sum is clipped per example to norm 1 anyway, with the certified
float32 factors of DP-SGD (`clipping.clip_factors`: rounding, NaN and inf inputs), so adding or removing one
example moves it by at most 1 (2 when one is replaced). The release is therefore exactly one step of the DP-SGD
mechanism with q = 1 and C = 1 (`DpSgdMechanism`): the same noise, event, accountant, ledger and statement. The
counts part releases the class proportions that the generator's targets are divided by (DP-MERF's label
distribution); `count_weight` b splits the unit sensitivity between the two parts.

Everything but the private sum is public: the frequencies come from config.seed, the length scale from the
public split (the median heuristic), F and b from the config.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpwave.privacy import clipping

Embedding = dict[str, jax.Array]  # {"embedding": (K, F), "counts": (K,)}


@dataclasses.dataclass(frozen=True)
class RandomFeatures:
    """phi(x) = [cos(x W), sin(x W)] / sqrt(F/2) for rows x of dimension d; `frequencies` W is (d, F/2)."""

    frequencies: jax.Array

    @property
    def num_features(self) -> int:
        return 2 * self.frequencies.shape[1]

    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, d) -> (B, F) float32 features of L2 norm 1 (up to rounding)."""
        proj = x.reshape(x.shape[0], -1).astype(jnp.float32) @ self.frequencies
        return jnp.concatenate([jnp.cos(proj), jnp.sin(proj)], axis=1) / jnp.sqrt(jnp.float32(proj.shape[1]))


def draw_features(key: jax.Array, dim: int, num_features: int, length_scale: float) -> RandomFeatures:
    """Random Fourier features of the Gaussian kernel exp(-||x - x'||^2 / (2 length_scale^2)) on R^dim."""
    if num_features < 2 or num_features % 2:
        raise ValueError(f"num_features={num_features} must be an even number >= 2 (cos and sin halves)")
    if not (math.isfinite(length_scale) and length_scale > 0):
        raise ValueError(f"length_scale={length_scale!r} must be a finite number > 0")
    w = jax.random.normal(key, (dim, num_features // 2), jnp.float32) / jnp.float32(length_scale)
    return RandomFeatures(w)


def median_length_scale(x: np.ndarray, max_points: int = 1000) -> float:
    """The median heuristic: the median L2 distance between distinct rows of the first `max_points` of `x` (public
    data only). Raises ValueError when every distance is 0 (no spread to set a scale from)."""
    rows = np.asarray(x, np.float64).reshape(len(x), -1)[:max_points]
    sq = np.sum(rows ** 2, axis=1)
    dist2 = np.maximum(sq[:, None] + sq[None, :] - 2 * rows @ rows.T, 0.0)
    upper = np.sqrt(dist2[np.triu_indices(len(rows), k=1)])
    scale = float(np.median(upper)) if upper.size else 0.0
    if not scale > 0:
        raise ValueError("the public images have no spread (median pairwise distance 0): the kernel's length scale "
                         "cannot be set from them; give config.data.public more varied images")
    return scale


def example_vectors(features: RandomFeatures, x: jax.Array, labels: jax.Array, num_classes: int,
                    count_weight: float) -> Embedding:
    """v(x_i, y_i) of every row: {"embedding": (B, K, F), "counts": (B, K)}, each row of norm 1 (up to rounding).
    Unconditional data: `num_classes` 1 and labels 0."""
    a = math.sqrt(1.0 - count_weight ** 2)
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    phi = features(x)
    return {"embedding": jnp.float32(a) * onehot[:, :, None] * phi[:, None, :],
            "counts": jnp.float32(count_weight) * onehot}


def clipped_sum(vectors: Embedding, mask: jax.Array) -> Embedding:
    """sum_i mask_i min(1, 1 / ||v_i||) v_i: each example moves the sum by at most 1 in L2, whatever its pixels
    (NaN or inf rows contribute 0; `clipping.clip_factors`)."""
    weights, _ = clipping.clip_factors(clipping.per_example_norms(vectors), mask, 1.0)
    return clipping.weighted_sum(vectors, weights)


def release(total: Embedding, noise: optax.GradientTransformation) -> Embedding:
    """The noised, normalized sum: `noise` is the mechanism's transform (`DpSgdMechanism.noise`, q = 1, C = 1), which
    adds N(0, sigma^2) to every coordinate once and divides by N."""
    out, _ = noise.update(total, noise.init(total))
    return out


def class_targets(released: Embedding, count_weight: float, num_examples: int,
                  min_count: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """(per-class mean embeddings (K, F), class proportions (K,)) decoded from a released mean: a class's
    proportion is its released count share (clamped to at least `min_count` examples, then normalized) and its
    mean embedding the released row divided by a times that proportion. Post-processing of the release."""
    a = math.sqrt(1.0 - count_weight ** 2)
    share = jnp.maximum(released["counts"] / jnp.float32(count_weight), jnp.float32(min_count / num_examples))
    proportions = share / jnp.sum(share)
    means = released["embedding"] / (jnp.float32(a) * share[:, None])
    return means, proportions


def embedding_loss(features: RandomFeatures, images: jax.Array, labels: jax.Array, means: jax.Array,
                   proportions: jax.Array) -> jax.Array:
    """DP-MERF's objective for a generated batch: sum_k p_k ||mean_k - mean of phi(generated of class k)||^2
    (classes absent from the batch count their target's whole norm)."""
    num_classes = means.shape[0]
    phi = features(images)
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    counts = jnp.maximum(onehot.sum(0), 1.0)
    generated = (onehot.T @ phi) / counts[:, None]
    return jnp.sum(proportions * jnp.sum((means - generated) ** 2, axis=1))
