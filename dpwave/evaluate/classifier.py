"""A small CNN classifier: evaluation feature network and downstream-utility model.

`train_classifier` fits it with Adam, deterministically from `config.seed` (initial
weights and the per-epoch shuffles). With a validation split it keeps the parameters of
the epoch with the best validation accuracy (earliest on ties); otherwise the last
epoch's. The model is used functionally: `nnx.split(model, nnx.Param, ...)` gives the
parameter pytree the jitted step differentiates.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dpwave.evaluate.batches import apply_in_batches
from dpwave.evaluate.images import LabeledImages, check_labels
from dpwave.validation import float_images


def _lecun_normal_flat(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """Flax's lecun_normal (truncated, fan-in), drawn as one flat vector then reshaped.

    Same distribution; XLA:CPU compiles a 1-D threefry draw several times faster than a
    4-D one, and eager initialization compiles one draw per shape.
    """
    std = math.sqrt(1.0 / math.prod(shape[:-1])) / 0.87962566103423978
    return (jax.random.truncated_normal(key, -2.0, 2.0, (math.prod(shape),), dtype) * std).reshape(shape)


class Classifier(nnx.Module):
    """[conv3x3-ReLU-maxpool2] x3 (widths w, 2w, 4w) -> dense(feature_dim)-ReLU (features) -> logits."""

    def __init__(self, image_shape: tuple[int, int, int], num_classes: int, *, width: int = 16,
                 feature_dim: int = 128, rngs: nnx.Rngs):
        h, w, c = image_shape
        if h < 8 or w < 8 or c < 1:
            raise ValueError(f"image_shape must be (H>=8, W>=8, C>=1), got {image_shape}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.image_shape = tuple(image_shape)
        self.convs = nnx.List([nnx.Conv(cin, cout, (3, 3), padding="SAME",
                                        kernel_init=_lecun_normal_flat, rngs=rngs)
                               for cin, cout in ((c, width), (width, 2 * width), (2 * width, 4 * width))])
        self.hidden = nnx.Linear((h // 8) * (w // 8) * 4 * width, feature_dim,
                                 kernel_init=_lecun_normal_flat, rngs=rngs)
        self.head = nnx.Linear(feature_dim, num_classes, kernel_init=_lecun_normal_flat, rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        """Penultimate-layer activations, (N, feature_dim)."""
        for conv in self.convs:
            x = nnx.max_pool(jax.nn.relu(conv(x)), (2, 2), strides=(2, 2))
        return jax.nn.relu(self.hidden(x.reshape(x.shape[0], -1)))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(self.features(x))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    learning_rate: float = 1e-3
    width: int = 16
    feature_dim: int = 128
    seed: int = 0

    def __post_init__(self):
        for name in ("epochs", "batch_size", "width", "feature_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"TrainConfig.learning_rate must be > 0, got {self.learning_rate}")


class FitResult(NamedTuple):
    model: Classifier
    history: list[dict[str, float]]  # per epoch: loss, and val_accuracy with a validation split
    best_epoch: int                  # 1-based epoch whose parameters `model` holds


def _prepare(images: np.ndarray, shape: tuple[int, ...], name: str) -> np.ndarray:
    x = float_images(images, name=name)
    if x.shape[1:] != tuple(shape):
        raise ValueError(f"{name} have shape {x.shape[1:]} per image; the classifier expects {tuple(shape)}")
    return x


def predict(model: Classifier, images: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
    """Predicted class per image, (N,) int."""
    return apply_in_batches(model, "__call__", _prepare(images, model.image_shape, "images"), batch_size).argmax(-1)


def accuracy(model: Classifier, images: np.ndarray, labels: np.ndarray, *, batch_size: int = 256) -> float:
    """Top-1 accuracy on labeled images."""
    labels = check_labels(labels, len(images))
    return float(np.mean(predict(model, images, batch_size=batch_size) == labels))


def classifier_features(model: Classifier, images: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
    """Penultimate-layer features, (N, feature_dim) float32."""
    return apply_in_batches(model, "features", _prepare(images, model.image_shape, "images"), batch_size)


def predict_from_features(model: Classifier, features: np.ndarray) -> np.ndarray:
    """Predicted class per row of `classifier_features(model, ...)`: the head applied in NumPy (no second pass)."""
    logits = np.asarray(features) @ np.asarray(model.head.kernel[...]) + np.asarray(model.head.bias[...])
    return logits.argmax(-1)


def loss_fn(params: nnx.State, graphdef: nnx.GraphDef, rest: nnx.State, x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of the classifier given by (graphdef, params, rest)."""
    logits = nnx.merge(graphdef, params, rest)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@functools.partial(jax.jit, static_argnums=(0, 1))
def _train_step(graphdef: nnx.GraphDef, learning_rate: float, params: nnx.State, rest: nnx.State,
                opt_state: optax.OptState, x: jax.Array, y: jax.Array):
    loss, grads = jax.value_and_grad(loss_fn)(params, graphdef, rest, x, y)
    updates, opt_state = optax.adam(learning_rate).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def train_classifier(images: np.ndarray, labels: np.ndarray, *, num_classes: int | None = None,
                     config: TrainConfig = TrainConfig(),
                     validation: LabeledImages | None = None) -> FitResult:
    """Trains a `Classifier` on labeled images (uint8 or [-1, 1] NHWC); see module docstring."""
    x = float_images(images, name="training images")
    y = check_labels(labels, len(x), name="training labels")
    num_classes = int(y.max()) + 1 if num_classes is None else num_classes
    if y.max() >= num_classes:
        raise ValueError(f"training labels reach {y.max()} but num_classes is {num_classes}")
    model = Classifier(x.shape[1:], num_classes, width=config.width, feature_dim=config.feature_dim,
                       rngs=nnx.Rngs(config.seed))
    if validation is not None:
        val_x = _prepare(validation[0], x.shape[1:], "validation images")
        val_y = check_labels(validation[1], len(val_x), name="validation labels")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = optax.adam(config.learning_rate).init(params)
    batch = min(config.batch_size, len(x))
    history, best_epoch, best_params, best_acc = [], config.epochs, None, -1.0
    for epoch in range(1, config.epochs + 1):
        order = np.random.default_rng([config.seed, epoch]).permutation(len(x))
        losses = []
        for start in range(0, len(x) - batch + 1, batch):
            idx = order[start:start + batch]
            params, opt_state, loss = _train_step(graphdef, config.learning_rate, params, rest, opt_state,
                                                  jnp.asarray(x[idx]), jnp.asarray(y[idx]))
            losses.append(loss)
        record = {"epoch": epoch, "loss": float(np.mean(jax.device_get(losses)))}
        if validation is not None:
            val_acc = accuracy(nnx.merge(graphdef, params, rest), val_x, val_y)
            record["val_accuracy"] = val_acc
            if val_acc > best_acc:
                best_acc, best_epoch, best_params = val_acc, epoch, params
        history.append(record)
    return FitResult(nnx.merge(graphdef, params if best_params is None else best_params, rest), history, best_epoch)
