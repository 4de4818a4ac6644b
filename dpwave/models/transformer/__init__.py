"""The AR transformer over wavelet tokens: the model (`model`), its losses and trainable subsets (`losses`) and
its autoregressive decoding (`decoding`). The public names of the three are importable from here."""

from dpwave.models.transformer.losses import (
    TRAINABLE_GROUPS,
    batch_loss,
    batch_losses,
    is_lora_leaf,
    per_example_loss,
    token_nll,
    trainable_groups,
    trainable_mask,
)
from dpwave.models.transformer.model import (
    LORA_TARGETS,
    ARTransformer,
    Attention,
    Block,
    Cache,
    Context,
    Mlp,
    TextEncoder,
    TransformerConfig,
    lora_targets,
)
from dpwave.models.transformer.decoding import check_sampling, filter_logits, guide, sample, scale_vocab_mask

__all__ = ["LORA_TARGETS", "TRAINABLE_GROUPS", "ARTransformer", "Attention", "Block", "Cache", "Context", "Mlp",
           "TextEncoder", "TransformerConfig", "batch_loss", "batch_losses", "check_sampling", "filter_logits",
           "guide", "is_lora_leaf", "lora_targets", "per_example_loss", "sample", "scale_vocab_mask", "token_nll",
           "trainable_groups", "trainable_mask"]
