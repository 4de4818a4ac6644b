"""Model FLOPs per training example: coarse-only AR model vs the all-scales baseline.

The coarse-to-fine method DP-trains the AR transformer on the coarse band's tokens
only; the all-scales baseline ("full DP") trains the same family, at the same width
and depth, on the tokens of every wavelet scale, ordered coarse -> fine. The DP cost
of a step scales with the per-example forward + backward FLOPs, which XLA counts here
(``jax.jit(...).lower(...).compile().cost_analysis()['flops']``) next to an analytic
estimate (2 FLOPs per multiply-add of the dense layers and of the full T x T attention
products; training = forward + backward).

Settings (token counts are arguments, the tokenizer defines them):
  mnist5k  : 32x32x1, 2 Haar levels: coarse 8x8 -> 16 tokens (2x2 patches); detail
             level 2 8x8x3 -> 16 tokens; detail level 1 16x16x3 -> 16 tokens (4x4 patches).
  paper256 : 256x256x3, 3 levels: coarse 32x32 -> 256 tokens (2x2 patches); details of
             levels 3, 2, 1 -> 256 tokens each (2x2, 4x4, 8x8 patches).

  python experiments/bench/bench_flops.py --out /tmp/bench_flops.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpwave import files
from dpwave.models.transformer import ARTransformer, TransformerConfig, per_example_loss


@dataclasses.dataclass(frozen=True)
class Setting:
    name: str
    coarse_tokens: int
    detail_tokens: tuple[int, ...]  # coarsest detail level first
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    vocab_size: int
    num_classes: int | None
    max_text_len: int


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def _configs(s: Setting) -> dict[str, TransformerConfig]:
    arch = dict(
        vocab_size=s.vocab_size,
        width=s.width,
        depth=s.depth,
        num_heads=s.num_heads,
        mlp_dim=s.mlp_dim,
        num_classes=s.num_classes,
        max_text_len=s.max_text_len,
        cond_dropout=0.1,
    )
    bounds = tuple(np.cumsum((s.coarse_tokens,) + s.detail_tokens).tolist())
    return {
        "coarse": TransformerConfig(seq_len=s.coarse_tokens, **arch),
        "all_scales": TransformerConfig(seq_len=bounds[-1], scale_boundaries=bounds, **arch),
    }


def _example(cfg: TransformerConfig) -> dict[str, jax.ShapeDtypeStruct]:
    example = {"tokens": jax.ShapeDtypeStruct((cfg.seq_len,), jnp.int32)}
    if cfg.conditioning == "class":
        example["label"] = jax.ShapeDtypeStruct((), jnp.int32)
    elif cfg.conditioning == "text":
        example["caption_bytes"] = jax.ShapeDtypeStruct((cfg.max_text_len,), jnp.int32)
    return example


def xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def analytic_forward_flops(cfg: TransformerConfig) -> float:
    """2 x multiply-adds of the decoder's dense layers, full attention products and the head."""
    seq = cfg.prefix_len + cfg.seq_len
    dense = cfg.depth * (4 * cfg.width**2 + 2 * cfg.width * cfg.mlp_dim)
    attention = cfg.depth * 2 * seq * cfg.width  # QK^T and PV per query
    flops = 2 * seq * (dense + attention) + 2 * cfg.seq_len * cfg.width * cfg.vocab_size
    if cfg.conditioning == "text":
        text_dense = cfg.text_depth * (4 * cfg.width**2 + 2 * cfg.width * cfg.mlp_dim)
        flops += 2 * cfg.max_text_len * (text_dense + cfg.text_depth * 2 * cfg.max_text_len * cfg.width)
    return float(flops)


def measure(cfg: TransformerConfig) -> dict:
    model = nnx.eval_shape(lambda: ARTransformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, params, _ = nnx.split(model, nnx.Param, ...)
    example, key = _example(cfg), jax.random.key(0)
    loss = functools.partial(per_example_loss, graphdef)
    start = time.perf_counter()
    forward = xla_flops(functools.partial(loss, train=False), params, example, None)
    train = xla_flops(jax.grad(loss), params, example, key)
    return {
        "seq_len": cfg.seq_len,
        "params": int(sum(np.prod(p.shape) for p in jax.tree.leaves(params))),
        "xla_forward_flops": forward,
        "xla_train_flops": train,
        "analytic_forward_flops": analytic_forward_flops(cfg),
        "analytic_train_flops": 3 * analytic_forward_flops(cfg),
        "compile_s": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mnist_coarse_tokens", type=int, default=16)
    parser.add_argument("--mnist_detail_tokens", type=_ints, default=(16, 16))
    parser.add_argument(
        "--mnist_arch", type=_ints, default=(256, 4, 4, 1024, 1024), help="width,depth,heads,mlp_dim,vocab_size"
    )
    parser.add_argument("--paper_coarse_tokens", type=int, default=256)
    parser.add_argument("--paper_detail_tokens", type=_ints, default=(256, 256, 256))
    parser.add_argument(
        "--paper_arch", type=_ints, default=(768, 12, 12, 3072, 4096), help="width,depth,heads,mlp_dim,vocab_size"
    )
    parser.add_argument(
        "--paper_text_len", type=int, default=0, help="caption bytes for the 256px setting (0: class-conditioned)"
    )
    parser.add_argument("--skip_paper", action="store_true")
    parser.add_argument("--out", default="/tmp/bench_flops.json")
    args = parser.parse_args()

    settings = [
        Setting(
            "mnist5k",
            args.mnist_coarse_tokens,
            args.mnist_detail_tokens,
            *args.mnist_arch,
            num_classes=10,
            max_text_len=0,
        )
    ]
    if not args.skip_paper:
        settings.append(
            Setting(
                "paper256",
                args.paper_coarse_tokens,
                args.paper_detail_tokens,
                *args.paper_arch,
                num_classes=None if args.paper_text_len else 1000,
                max_text_len=args.paper_text_len,
            )
        )
    rows = []
    header = (
        f"{'setting':9} {'model':10} {'tokens':>6} {'params':>11} {'XLA fwd':>10} "
        f"{'XLA train':>10} {'analytic tr':>11} {'ratio':>6}"
    )
    print(header + "\n" + "-" * len(header))
    for setting in settings:
        results = {name: measure(cfg) for name, cfg in _configs(setting).items()}
        base = results["coarse"]["xla_train_flops"]
        for name, r in results.items():
            r.update(
                setting=setting.name,
                model=name,
                arch=dataclasses.asdict(setting),
                train_flops_ratio_vs_coarse=r["xla_train_flops"] / base,
            )
            rows.append(r)
            print(
                f"{setting.name:9} {name:10} {r['seq_len']:6d} {r['params']:11,d} "
                f"{r['xla_forward_flops'] / 1e9:9.3f}G {r['xla_train_flops'] / 1e9:9.3f}G "
                f"{r['analytic_train_flops'] / 1e9:10.3f}G {r['train_flops_ratio_vs_coarse']:6.2f}"
            )
    files.write_json(args.out, {"backend": jax.default_backend(), "rows": rows}, sort_keys=False)
    print(f"ratio = all-scales / coarse-only training FLOPs per example; wrote {args.out}")


if __name__ == "__main__":
    main()
