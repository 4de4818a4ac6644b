"""Dense layer with an optional low-rank adapter (LoRA, Hu et al. 2021).

``y = x W + b + (alpha / r) * (x A) B`` with ``A`` Gaussian and ``B`` zero at init,
so adding adapters leaves the model's function unchanged until ``B`` is trained.
Adapters are ``nnx.LoRAParam`` (a subclass of ``nnx.Param``) named ``lora_a`` /
``lora_b``, so ``nnx.split(model, nnx.Param, ...)`` keeps them with the params and
their paths identify them for parameter-efficient finetuning masks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

LORA_LEAF_NAMES = ("lora_a", "lora_b")


class Dense(nnx.Module):
    """``x @ kernel + bias`` computed in ``dtype``; parameters are always float32."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rngs: nnx.Rngs,
        dtype: str = "float32",
        kernel_std: float = 0.02,
        use_bias: bool = True,
        lora_rank: int = 0,
        lora_alpha: float | None = None,
    ):
        if lora_rank < 0:
            raise ValueError(f"lora_rank must be >= 0, got {lora_rank}")
        init = jax.nn.initializers.normal(kernel_std)
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32)) if use_bias else None
        self.dtype = dtype
        if lora_rank > 0:
            a_init = jax.nn.initializers.normal(in_features**-0.5)
            self.lora_a = nnx.LoRAParam(a_init(rngs.params(), (in_features, lora_rank), jnp.float32))
            self.lora_b = nnx.LoRAParam(jnp.zeros((lora_rank, out_features), jnp.float32))
            self.lora_scale = float(lora_alpha if lora_alpha is not None else lora_rank) / lora_rank
        else:
            self.lora_a = self.lora_b = None
            self.lora_scale = 0.0

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = jnp.dtype(self.dtype)
        x = x.astype(dt)
        y = x @ self.kernel[...].astype(dt)
        if self.lora_a is not None:
            low_rank = (x @ self.lora_a[...].astype(dt)) @ self.lora_b[...].astype(dt)
            y = y + (self.lora_scale * low_rank).astype(dt)
        if self.bias is not None:
            y = y + self.bias[...].astype(dt)
        return y
