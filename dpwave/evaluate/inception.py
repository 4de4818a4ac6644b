"""The FID InceptionV3 network (pool3, 2048-d) in Flax NNX.

Architecture of the TensorFlow `inception-2015-12-05` graph as ported by pytorch-fid
(`pt_inception-2015-12-05-6726825d.pth`): torchvision's Inception3 with the FID blocks,
i.e. the 3x3 average pools inside Mixed_5b-5d, 6b-6e and 7b exclude the zero padding from
the mean, and Mixed_7c's pool branch is a 3x3 max pool. Inputs in [-1, 1] are resized to
299x299 bilinearly with half-pixel centers and no antialiasing (PyTorch's
`interpolate(mode="bilinear", align_corners=False)`), then the global average pool after
Mixed_7c gives the features. Module and attribute names mirror the PyTorch state dict, so
weight file keys are the PyTorch keys with NNX leaf names (see `inception_weights.py`).
Batch norms run on their stored statistics (eps = 1e-3).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

FEATURE_DIM = 2048
INPUT_SIZE = 299
MIN_INPUT_SIZE = 75  # smallest size the stride-2 stages accept


def check_input_size(size: int) -> int:
    """Validates the square size images are resized to (299 for FID)."""
    if size < MIN_INPUT_SIZE:
        raise ValueError(f"input_size must be >= {MIN_INPUT_SIZE}, got {size}; FID uses {INPUT_SIZE}")
    return size


def resize_bilinear(x: jax.Array, size: int) -> jax.Array:
    """Resizes NHWC to (size, size) like PyTorch bilinear with align_corners=False."""
    return jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), method="linear", antialias=False)


def pool3x3_same(x: jax.Array, kind: str) -> jax.Array:
    """3x3 stride-1 pool, padding 1: "max", or "avg" with the padding left out of the mean."""
    pad = ((1, 1), (1, 1))
    if kind == "max":
        return nnx.max_pool(x, (3, 3), strides=(1, 1), padding=pad)
    return nnx.avg_pool(x, (3, 3), strides=(1, 1), padding=pad, count_include_pad=False)


def _pool_down(x: jax.Array) -> jax.Array:
    return nnx.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class BasicConv2d(nnx.Module):
    """Conv (no bias) -> batch norm (eps 1e-3, stored statistics) -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int | tuple[int, int], *, stride: int = 1,
                 padding: int | tuple[int, int] = 0, rngs: nnx.Rngs):
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
        ph, pw = (padding, padding) if isinstance(padding, int) else padding
        self.conv = nnx.Conv(cin, cout, (kh, kw), strides=(stride, stride),
                             padding=((ph, ph), (pw, pw)), use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(cout, epsilon=1e-3, use_running_average=True, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x)))


class InceptionA(nnx.Module):
    """Mixed_5b-5d (FID variant: average pool excludes padding)."""

    def __init__(self, cin: int, pool_features: int, *, rngs: nnx.Rngs):
        self.branch1x1 = BasicConv2d(cin, 64, 1, rngs=rngs)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1, rngs=rngs)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
        self.branch_pool = BasicConv2d(cin, pool_features, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.concatenate([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(pool3x3_same(x, "avg")),
        ], axis=-1)


class InceptionB(nnx.Module):
    """Mixed_6a: grid reduction 35 -> 17."""

    def __init__(self, cin: int, *, rngs: nnx.Rngs):
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.concatenate([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            _pool_down(x),
        ], axis=-1)


class InceptionC(nnx.Module):
    """Mixed_6b-6e: factorized 7x7 convolutions (FID variant average pool)."""

    def __init__(self, cin: int, c7: int, *, rngs: nnx.Rngs):
        self.branch1x1 = BasicConv2d(cin, 192, 1, rngs=rngs)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d7 = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d7 = layer(d7)
        return jnp.concatenate([self.branch1x1(x), b7, d7, self.branch_pool(pool3x3_same(x, "avg"))], axis=-1)


class InceptionD(nnx.Module):
    """Mixed_7a: grid reduction 17 -> 8."""

    def __init__(self, cin: int, *, rngs: nnx.Rngs):
        self.branch3x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b7 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return jnp.concatenate([self.branch3x3_2(self.branch3x3_1(x)), b7, _pool_down(x)], axis=-1)


class InceptionE(nnx.Module):
    """Mixed_7b/7c: expanded filter bank; `pool` is "avg" (7b) or "max" (7c) in the FID net."""

    def __init__(self, cin: int, *, pool: str, rngs: nnx.Rngs):
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1, rngs=rngs)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1, rngs=rngs)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.branch3x3_1(x)
        d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return jnp.concatenate([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3),
            self.branch_pool(pool3x3_same(x, self.pool)),
        ], axis=-1)


class InceptionV3(nnx.Module):
    """FID InceptionV3 up to pool3: (N, H, W, 3) in [-1, 1] -> (N, 2048).

    `input_size` is the square size images are resized to: 299 for FID; smaller sizes
    (>= 75) run the same weights faster and exist for tests only.
    """

    def __init__(self, *, rngs: nnx.Rngs, input_size: int = INPUT_SIZE):
        self.input_size = check_input_size(input_size)
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
        self.Mixed_5b = InceptionA(192, 32, rngs=rngs)
        self.Mixed_5c = InceptionA(256, 64, rngs=rngs)
        self.Mixed_5d = InceptionA(288, 64, rngs=rngs)
        self.Mixed_6a = InceptionB(288, rngs=rngs)
        self.Mixed_6b = InceptionC(768, 128, rngs=rngs)
        self.Mixed_6c = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6d = InceptionC(768, 160, rngs=rngs)
        self.Mixed_6e = InceptionC(768, 192, rngs=rngs)
        self.Mixed_7a = InceptionD(768, rngs=rngs)
        self.Mixed_7b = InceptionE(1280, pool="avg", rngs=rngs)
        self.Mixed_7c = InceptionE(2048, pool="max", rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = resize_bilinear(x.astype(jnp.float32), self.input_size)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(_pool_down(x)))
        x = _pool_down(x)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                      self.Mixed_7c):
            x = block(x)
        return x.mean(axis=(1, 2))
