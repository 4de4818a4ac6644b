"""A pixel-space flow-matching model: the public-pretrained, DP-finetuned diffusion baseline (the PDP-Diffusion /
DP-LDM family: Ghalebikesabi et al. 2023, Lyu et al. 2023), sized for a CPU.

A small U-Net: a 3x3 stem at full resolution, a strided conv to half resolution, `num_blocks` residual blocks
with FiLM from the time (and class label) embedding (`refiner.ResBlock`), nearest upsampling, the stem's
features concatenated back, and a zero-initialized head. Objective: conditional flow matching with
x-prediction, as the refiner's: on x_t = (1 - t) z + t x the net predicts x; sampling integrates the velocity
(x_hat - x_t) / (1 - t) with `sample_steps` Euler steps from z ~ N(0, I). Images are [-1, 1] NHWC.

Classifier-free guidance (Ho & Salimans 2022), as the DP-finetuned diffusion baselines use it: training replaces
the label by a null class with probability `cond_dropout`, and sampling with `guidance_scale` s predicts
x_c + s (x_c - x_u) (the AR model's convention: s = 0 is the conditional model alone).

`example_loss` draws t, z and the label drop from the example's own key (`dpwave.privacy.keys.content_key` in the
DP step), so adding or removing one example changes no other example's randomness.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from dpwave.models.refiner import ResBlock, time_features
from dpwave.validation import check_int

_TIME_FEATURES = 64


@dataclasses.dataclass(frozen=True)
class PixelFlowConfig:
    """Architecture, training's condition dropout and sampling; `num_classes` None for an unconditional model.
    `image_size` must be even."""

    image_size: int = 32
    channels: int = 1
    num_classes: int | None = None
    width: int = 32
    num_blocks: int = 3
    sample_steps: int = 20
    cond_dropout: float = 0.0

    def __post_init__(self) -> None:
        check_int("image_size", self.image_size, 2)
        if self.image_size % 2:
            raise ValueError(f"image_size={self.image_size} must be even (one 2x downsampling)")
        check_int("channels", self.channels, 1)
        if self.num_classes is not None:
            check_int("num_classes", self.num_classes, 1)
        check_int("width", self.width, 1)
        check_int("num_blocks", self.num_blocks, 1)
        check_int("sample_steps", self.sample_steps, 1)
        if not (isinstance(self.cond_dropout, (int, float)) and 0 <= self.cond_dropout < 1):
            raise ValueError(f"cond_dropout={self.cond_dropout!r} must be in [0, 1)")


class PixelFlow(nnx.Module):
    def __init__(self, config: PixelFlowConfig, *, rngs: nnx.Rngs):
        self.config = config
        w, c = config.width, config.channels
        self.time_mlp = nnx.Sequential(nnx.Linear(_TIME_FEATURES, w, rngs=rngs), nnx.silu, nnx.Linear(w, w, rngs=rngs))
        # One row more than the classes: the null class that condition dropout trains and guidance samples.
        self.label_embed = nnx.Embed(config.num_classes + 1, w, rngs=rngs) if config.num_classes else None
        self.stem = nnx.Conv(c, w, (3, 3), rngs=rngs)
        self.down = nnx.Conv(w, w, (3, 3), strides=(2, 2), rngs=rngs)
        self.blocks = nnx.List([ResBlock(w, w, jnp.float32, rngs=rngs) for _ in range(config.num_blocks)])
        self.up = nnx.Conv(2 * w, w, (3, 3), rngs=rngs)
        self.out_norm = nnx.GroupNorm(w, num_groups=math.gcd(8, w), rngs=rngs)
        self.head = nnx.Conv(w, c, (3, 3), kernel_init=nnx.initializers.zeros, rngs=rngs)

    def __call__(self, x_t: jax.Array, t: jax.Array, label: jax.Array | None) -> jax.Array:
        """(N, H, W, C) noisy images, (N,) times in [0, 1), (N,) labels -> (N, H, W, C) predicted images."""
        cond = self.time_mlp(time_features(t))
        if self.label_embed is not None:
            cond = cond + self.label_embed(label)
        skip = self.stem(x_t)
        h = self.down(nnx.silu(skip))
        for block in self.blocks:
            h = block(h, cond)
        h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
        h = self.up(jnp.concatenate([h, skip], axis=-1))
        return self.head(nnx.silu(self.out_norm(h)))


def example_loss(graphdef: nnx.GraphDef, params: nnx.State, example: dict[str, jax.Array], key: jax.Array,
                 cond_dropout: float | None = None) -> jax.Array:
    """Flow-matching loss of ONE example {"image": (H, W, C) in [-1, 1], ["label": ()]} with t, z and the label
    drop (probability `cond_dropout`; None: the model config's) from `key`."""
    model = nnx.merge(graphdef, params)
    cfg = model.config
    x = example["image"][None].astype(jnp.float32)
    k_t, k_z, k_drop = jax.random.split(key, 3)
    t = jax.random.uniform(k_t, (1,), jnp.float32)
    z = jax.random.normal(k_z, x.shape, jnp.float32)
    label = None
    if cfg.num_classes:
        rate = cfg.cond_dropout if cond_dropout is None else cond_dropout
        label = jnp.where(jax.random.bernoulli(k_drop, rate, (1,)), cfg.num_classes, example["label"][None])
    return jnp.mean(jnp.square(model((1.0 - t) * z + t * x, t, label) - x))


def batch_loss(graphdef: nnx.GraphDef, params: nnx.State, batch: dict[str, jax.Array],
               key: jax.Array) -> jax.Array:
    """Mean of `example_loss` over a batch, example i drawing with fold_in(key, i) (public training)."""
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch["image"].shape[0]))
    return jnp.mean(jax.vmap(lambda e, k: example_loss(graphdef, params, e, k))(batch, keys))


def generate(graphdef: nnx.GraphDef, params: nnx.State, labels: jax.Array, key: jax.Array,
             guidance_scale: float = 0.0) -> jax.Array:
    """Images of `labels` ((N,) ints; zeros for an unconditional model), Euler-integrated from noise of `key`, with
    classifier-free guidance `guidance_scale` (0: the conditional model alone; ignored without labels)."""
    model = nnx.merge(graphdef, params)
    cfg = model.config
    n, steps = labels.shape[0], cfg.sample_steps
    label = labels if cfg.num_classes else None
    guided = bool(guidance_scale) and label is not None
    dt = 1.0 / steps

    def predict(x, t):
        if not guided:
            return model(x, t, label)
        both = model(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                     jnp.concatenate([label, jnp.full_like(label, cfg.num_classes)]))
        cond, uncond = both[:n], both[n:]
        return cond + guidance_scale * (cond - uncond)

    def euler(i, x):
        t = i * dt
        x1 = predict(x, jnp.full((n,), t, jnp.float32))
        return x + dt * (x1 - x) / (1.0 - t)

    x0 = jax.random.normal(key, (n, cfg.image_size, cfg.image_size, cfg.channels), jnp.float32)
    return jnp.clip(jax.lax.fori_loop(0, steps, euler, x0), -1.0, 1.0)
