"""From an experiment config to the objects a stage needs: dataset specs and model configs."""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from dpwave import data
from dpwave.data import overlap
from dpwave.models.refiner import RefinerConfig
from dpwave.models.tokenizer import TokenizerConfig
from dpwave.models.transformer import TransformerConfig

METHODS = ("dpwave", "full_dp", "bicubic")
ROLES = ("public", "private", "heldout", "test")


def check_method(config: ml_collections.ConfigDict) -> str:
    if config.method not in METHODS:
        raise ValueError(f"config.method={config.method!r} is unknown; use one of {METHODS}")
    return config.method


def dataset_spec(config: ml_collections.ConfigDict, role: str) -> data.DatasetSpec:
    """The spec of `config.data.<role>` (public, private, heldout, test) at the run's image size."""
    section = config.data[role].to_dict()
    for key in ("data_dir", "manual_dir"):
        section[key] = section.get(key) or None
    spec = data.DatasetSpec.from_config(
        {**section, "resolution": config.data.image_size, "channels": config.data.channels})
    expected = "private" if role == "private" and not config.dp.tuning else "public"
    if spec.privacy != expected:
        why = ("a tuning run (dp.tuning) reads no private data: its DP input stands in for it" if config.dp.tuning
               else "only the DP stage reads private data")
        raise ValueError(f"config.data.{role} is tagged privacy={spec.privacy!r}; the {role} role must be "
                         f"{expected!r} ({why})")
    return spec


def load(config: ml_collections.ConfigDict, role: str) -> data.Source:
    return data.load(dataset_spec(config, role), role=f"config.data.{role}")


def check_data_boundary(config: ml_collections.ConfigDict) -> dict[str, overlap.PixelHashes]:
    """Run-start check of every role: privacy and split tags, then no image of the private set in a role
    read without DP (public; heldout, whose captions are also the sampling prompts; test).

    Raises:
      PrivateSplitError, PrivateOverlapError, ValueError: naming the role.
    """
    sources = {role: data.load(dataclasses.replace(dataset_spec(config, role), in_memory=False),
                               role=f"config.data.{role}") for role in ROLES}
    private = sources.pop("private")
    return overlap.check_disjoint(private, {f"config.data.{role}": s for role, s in sources.items()})


def _common(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return dict(channels=config.data.channels, levels=config.wavelet.levels, wavelet=config.wavelet.name,
                mode=config.wavelet.mode)


def tokenizer_config(config: ml_collections.ConfigDict) -> TokenizerConfig:
    size = config.data.image_size
    return TokenizerConfig(image_size=(size, size), **_common(config), **config.tokenizer.model.to_dict())


def refiner_config(config: ml_collections.ConfigDict) -> RefinerConfig:
    num_classes = config.data.num_classes if config.data.condition == "label" else None
    return RefinerConfig(image_size=config.data.image_size, num_classes=num_classes, **_common(config),
                         **config.refiner.model.to_dict())


def coarse_only(config: ml_collections.ConfigDict) -> bool:
    """dpwave and its bicubic ablation model only the coarse band; the full-DP baseline all scales."""
    return check_method(config) != "full_dp"


def transformer_config(config: ml_collections.ConfigDict, tok: TokenizerConfig, *,
                       finetune: bool = False) -> TransformerConfig:
    """The AR model over the coarse tokens (dpwave) or over every scale's tokens (full_dp). `finetune`: the DP
    stage's model, which adds the LoRA adapters of `dp.lora_rank` and uses `dp.cond_dropout` when set."""
    model = config.transformer.to_dict()
    if finetune:
        dp = config.dp
        model.update(lora_rank=dp.lora_rank, lora_targets=dp.lora_targets)
        if dp.cond_dropout is not None:
            model["cond_dropout"] = dp.cond_dropout
    condition = config.data.condition
    if condition not in ("label", "caption", "none"):
        raise ValueError(f"config.data.condition={condition!r}; use 'label', 'caption' or 'none'")
    if condition != "caption":
        model["max_text_len"] = 0
    if condition == "none":
        model["cond_dropout"] = 0.0
    if coarse_only(config):
        return TransformerConfig(vocab_size=tok.codebook_size, seq_len=tok.tokens_per_scale[0],
                                 num_classes=config.data.num_classes if condition == "label" else None, **model)
    return TransformerConfig(vocab_size=tok.vocab_size, seq_len=tok.scale_boundaries[-1],
                             scale_boundaries=tok.scale_boundaries,
                             num_classes=config.data.num_classes if condition == "label" else None, **model)
