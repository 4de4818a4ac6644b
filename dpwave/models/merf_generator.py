"""DP-MERF's generator (Harder et al., AISTATS 2021): a code z ~ N(0, I) and a class label to an image in [-1, 1].

Fully connected layers on [z, one-hot label] (the authors' MNIST generator, 200-100 with batch norm); here, for
images of side >= 16 and divisible by 4, two nearest-neighbour upsamplings with 3x3 convolutions follow, and
smaller outputs (a coarse wavelet band) are one dense layer. The output is tanh, the project's [-1, 1] pixel range
(the authors use sigmoid on [0, 1]). No batch norm: the model holds parameters only, so sampling is a pure
function. It is trained on a released embedding only (`dpwave.privacy.mean_embedding.embedding_loss`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from dpwave.validation import check_int


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
    """`out_shape` (H, W, C) of the generated images; `num_classes` 1 for unconditional data."""

    out_shape: tuple[int, int, int]
    num_classes: int
    code_dim: int = 5
    hidden: tuple[int, ...] = (200, 500)
    conv_channels: tuple[int, int] = (16, 8)

    def __post_init__(self) -> None:
        for i, side in enumerate(self.out_shape):
            check_int(f"out_shape[{i}]", side, 1)
        check_int("num_classes", self.num_classes, 1)
        check_int("code_dim", self.code_dim, 1)
        for i, width in enumerate((*self.hidden, *self.conv_channels)):
            check_int(f"hidden/conv width {i}", width, 1)

    @property
    def convolutional(self) -> bool:
        h, w, _ = self.out_shape
        return min(h, w) >= 16 and h % 4 == 0 and w % 4 == 0


class MerfGenerator(nnx.Module):
    def __init__(self, config: GeneratorConfig, *, rngs: nnx.Rngs):
        self.config = config
        h, w, c = config.out_shape
        widths = (config.code_dim + config.num_classes, *config.hidden)
        self.hidden = nnx.List([nnx.Linear(i, o, rngs=rngs) for i, o in zip(widths[:-1], widths[1:])])
        if config.convolutional:
            c1, c2 = config.conv_channels
            self.out = nnx.Linear(widths[-1], (h // 4) * (w // 4) * c1, rngs=rngs)
            self.convs = nnx.List([nnx.Conv(c1, c2, (3, 3), rngs=rngs), nnx.Conv(c2, c, (3, 3), rngs=rngs)])
        else:
            self.out = nnx.Linear(widths[-1], h * w * c, rngs=rngs)
            self.convs = nnx.List([])

    def __call__(self, code: jax.Array, labels: jax.Array) -> jax.Array:
        """(B, code_dim) codes and (B,) int labels -> (B, H, W, C) images in [-1, 1]."""
        cfg = self.config
        x = jnp.concatenate([code, jax.nn.one_hot(labels, cfg.num_classes, dtype=code.dtype)], axis=1)
        for layer in self.hidden:
            x = nnx.relu(layer(x))
        h, w, c = cfg.out_shape
        if not cfg.convolutional:
            return jnp.tanh(self.out(x)).reshape(-1, h, w, c)
        x = nnx.relu(self.out(x)).reshape(-1, h // 4, w // 4, cfg.conv_channels[0])
        for i, conv in enumerate(self.convs):
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            x = conv(x)
            x = nnx.relu(x) if i == 0 else jnp.tanh(x)
        return x


def generate(graphdef: nnx.GraphDef, params: nnx.State, labels: jax.Array, key: jax.Array) -> jax.Array:
    """Images of the given labels, codes drawn from `key`: a pure function of its arguments."""
    model = nnx.merge(graphdef, params)
    code = jax.random.normal(key, (labels.shape[0], model.config.code_dim), jnp.float32)
    return model(code, labels)
