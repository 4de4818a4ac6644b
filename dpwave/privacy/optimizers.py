"""DP optimizers: `optax.chain(privatize, optimizer)`, and a builder from an ml_collections config.

By default the input is the SUM of clipped per-example gradients (`clipping.clipped_grad`, the
memory-bounded path); with `per_example=True` it is per-example gradients with a leading batch
axis plus the `mask` extra argument (`noise.dp_aggregate`). Both give the same update for the same
key.
"""

from typing import Any

import jax
import ml_collections
import optax

from dpwave.privacy.noise import dp_aggregate, noise_and_normalize

# Stream id folded into jax.random.key(config.seed) for the noise key, so the noise never reuses
# the keys other components derive from the same seed (e.g. fold_in(key(seed), step)).
NOISE_STREAM = 0x6E6F6973  # "nois"
_REQUIRED = ("name", "learning_rate", "l2_clip", "noise_multiplier", "expected_batch_size", "seed")
_OPTIONAL = {
    "b1": 0.9,
    "b2": 0.999,
    "eps": 1e-8,
    "weight_decay": 0.0,
    "momentum": None,
    "nesterov": False,
    "per_example": False,
}


def privatizer(
    *,
    l2_clip: float,
    noise_multiplier: float,
    expected_batch_size: float,
    key: int | jax.Array,
    per_example: bool = False,
) -> optax.GradientTransformation:
    """The DP aggregation step: `dp_aggregate` if `per_example` else `noise_and_normalize`."""
    make = dp_aggregate if per_example else noise_and_normalize
    return make(l2_clip=l2_clip, noise_multiplier=noise_multiplier, expected_batch_size=expected_batch_size, key=key)


def dp_sgd(
    learning_rate: optax.ScalarOrSchedule,
    *,
    l2_clip: float,
    noise_multiplier: float,
    expected_batch_size: float,
    key: int | jax.Array,
    momentum: float | None = None,
    nesterov: bool = False,
    per_example: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """DP-SGD: privatize, then `optax.sgd`."""
    return optax.chain(
        privatizer(
            l2_clip=l2_clip,
            noise_multiplier=noise_multiplier,
            expected_batch_size=expected_batch_size,
            key=key,
            per_example=per_example,
        ),
        optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
    )


def dp_adam(
    learning_rate: optax.ScalarOrSchedule,
    *,
    l2_clip: float,
    noise_multiplier: float,
    expected_batch_size: float,
    key: int | jax.Array,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    per_example: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """DP-Adam: privatize, then `optax.adam`."""
    return optax.chain(
        privatizer(
            l2_clip=l2_clip,
            noise_multiplier=noise_multiplier,
            expected_batch_size=expected_batch_size,
            key=key,
            per_example=per_example,
        ),
        optax.adam(learning_rate, b1=b1, b2=b2, eps=eps),
    )


def dp_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    l2_clip: float,
    noise_multiplier: float,
    expected_batch_size: float,
    key: int | jax.Array,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    per_example: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """DP-AdamW: privatize, then `optax.adamw` (decay acts on params: no privacy cost)."""
    return optax.chain(
        privatizer(
            l2_clip=l2_clip,
            noise_multiplier=noise_multiplier,
            expected_batch_size=expected_batch_size,
            key=key,
            per_example=per_example,
        ),
        optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay),
    )


def noise_key(seed: int) -> jax.Array:
    """The noise stream's key for a run seed: fold_in(key(seed), NOISE_STREAM)."""
    return jax.random.fold_in(jax.random.key(seed), NOISE_STREAM)


def dp_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
    """Builds dp_sgd / dp_adam / dp_adamw from a config.

    Required fields: name ('sgd' | 'adam' | 'adamw'), learning_rate, l2_clip, noise_multiplier
    (0 = non-private reference, still clipped), expected_batch_size (q * N), seed. Optional:
    b1, b2, eps (adam, adamw), weight_decay (adamw), momentum, nesterov (sgd), per_example.
    """
    cfg: dict[str, Any] = dict(config.items())
    unknown = sorted(set(cfg) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise ValueError(
            f"unknown DP optimizer config fields {unknown}; known: {sorted(_REQUIRED) + sorted(_OPTIONAL)}."
        )
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise ValueError(f"DP optimizer config lacks required fields {missing}.")
    opts = {**_OPTIONAL, **{k: cfg[k] for k in _OPTIONAL if k in cfg}}
    name, seed = cfg["name"], cfg["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}.")
    if name not in ("sgd", "adam", "adamw"):
        raise ValueError(f"unknown DP optimizer name {name!r}; use 'sgd', 'adam' or 'adamw'.")
    if opts["weight_decay"] and name != "adamw":
        raise ValueError(
            f"weight_decay={opts['weight_decay']} applies only to name='adamw' "
            f"(got {name!r}); set weight_decay=0 or use adamw."
        )
    if opts["momentum"] is not None and name != "sgd":
        raise ValueError(f"momentum applies only to name='sgd' (got {name!r}); set it to None.")
    common = dict(
        l2_clip=cfg["l2_clip"],
        noise_multiplier=cfg["noise_multiplier"],
        expected_batch_size=cfg["expected_batch_size"],
        key=noise_key(seed),
        per_example=opts["per_example"],
    )
    lr = cfg["learning_rate"]
    if name == "sgd":
        return dp_sgd(lr, momentum=opts["momentum"], nesterov=opts["nesterov"], **common)
    adam_args = dict(b1=opts["b1"], b2=opts["b2"], eps=opts["eps"])
    if name == "adam":
        return dp_adam(lr, **adam_args, **common)
    return dp_adamw(lr, weight_decay=opts["weight_decay"], **adam_args, **common)
