"""Losses and trainable subsets of the AR transformer (functional: pure params pytrees, explicit keys)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dpwave.models.lora import LORA_LEAF_NAMES
from dpwave.models.transformer.model import ARTransformer, TransformerConfig

# Named parameter groups of `trainable_mask`, '+'-joined ("cond+lora").
TRAINABLE_GROUPS = ("all", "attention", "mlp", "norm", "embed", "cond", "head", "lora")


def _example_cond(cfg: TransformerConfig, batch: Mapping[str, jax.Array]) -> jax.Array | None:
    name = {"class": "label", "text": "caption_bytes", "none": None}[cfg.conditioning]
    if name is not None and name not in batch:
        raise ValueError(
            f"a {cfg.conditioning}-conditioned model needs {name!r} in the example; got keys {sorted(batch)}"
        )
    return None if name is None else batch[name]


def token_nll(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Mean next-token negative log-likelihood per sequence: (B, T, V), (B, T) -> (B,) float32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0].mean(-1)


def batch_losses(
    model: ARTransformer, batch: Mapping[str, jax.Array], rng: jax.Array | None, *, train: bool = True
) -> jax.Array:
    """Per-example losses (B,) of a batch {"tokens": (B, T), "label" | "caption_bytes": ...}."""
    logits = model(batch["tokens"], _example_cond(model.config, batch), train=train, key=rng)
    return token_nll(logits, batch["tokens"])


def per_example_loss(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    example: Mapping[str, jax.Array],
    rng: jax.Array | None,
    *,
    train: bool = True,
) -> jax.Array:
    """Scalar loss of ONE example (no batch axis), for ``jax.vmap(jax.grad(...))``."""
    model = nnx.merge(graphdef, params)
    return batch_losses(model, jax.tree.map(lambda x: x[None], dict(example)), rng, train=train)[0]


def batch_loss(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    batch: Mapping[str, jax.Array],
    rng: jax.Array | None,
    *,
    train: bool = True,
) -> jax.Array:
    """Mean loss over a batch (non-private training, evaluation)."""
    return batch_losses(nnx.merge(graphdef, params), batch, rng, train=train).mean()


# ---- trainable subsets ---------------------------------------------------------------------
def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def is_lora_leaf(path) -> bool:
    """Whether the parameter at pytree ``path`` is a LoRA adapter (``lora_a`` / ``lora_b``)."""
    return any(n in LORA_LEAF_NAMES for n in _path_names(path))


_EMBEDDINGS = ("token_embed", "pos_embed", "bos", "scale_embed")
_CONDITION = ("class_embed", "null_embed", "text_encoder")


def _in_group(group: str, names: list[str]) -> bool:
    """Whether the leaf at path ``names`` belongs to the named parameter group."""
    is_lora = any(n in LORA_LEAF_NAMES for n in names)
    if group in ("all", "lora"):
        return group == "all" or is_lora
    if is_lora:
        return False
    return {
        "attention": "attn" in names,
        "mlp": "mlp" in names,
        "norm": any(n.endswith("norm") for n in names),
        "embed": names[0] in _EMBEDDINGS,
        "cond": names[0] in _CONDITION,
        "head": names[0] == "head",
    }[group]


def trainable_groups(spec: str) -> tuple[str, ...]:
    """The groups of a '+'-joined ``trainable_mask`` spec, e.g. ``"cond+lora"`` -> ("cond", "lora")."""
    groups = tuple(spec.split("+")) if isinstance(spec, str) else ()
    if not groups or any(g not in TRAINABLE_GROUPS for g in groups):
        raise ValueError(f"trainable_mask mode {spec!r}: use a '+'-joined subset of {TRAINABLE_GROUPS}")
    return groups


def trainable_mask(params: Any, mode: str) -> Any:
    """Bool pytree with ``params``' structure selecting the leaves to finetune.

    ``mode`` is a '+'-joined union of named groups (LoRA adapters belong only to ``lora`` and ``all``):
    ``all`` every leaf; ``attention`` the q/k/v/output projections of every self-attention layer
    (decoder and text encoder); ``mlp`` the MLP layers; ``norm`` every LayerNorm/RMSNorm; ``embed``
    the token, position, BOS and scale embeddings; ``cond`` the condition encoders (class table incl.
    its null row, or the caption encoder and null embedding); ``head`` the output layer; ``lora`` the
    LoRA adapters (needs ``lora_rank > 0``). Training few coordinates under DP shrinks the noise, whose
    norm grows with the square root of their number (Yu et al. 2022, "Differentially Private
    Fine-tuning of Language Models"; Li et al. 2022, "Large Language Models Can Be Strong Differentially
    Private Learners"). Each group must select at least one leaf.
    """
    groups = trainable_groups(mode)
    for group in groups:
        if not any(_in_group(group, _path_names(p)) for p, _ in jax.tree_util.tree_leaves_with_path(params)):
            raise ValueError(
                f"trainable_mask group {group!r} (of {mode!r}) selects no parameter"
                + (" (build the model with lora_rank > 0)" if group == "lora" else "")
            )
    return jax.tree_util.tree_map_with_path(
        lambda path, _: any(_in_group(g, _path_names(path)) for g in groups), params
    )
