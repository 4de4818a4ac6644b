"""Sizes from the data (used by folder.py): the wavelet, tokenizer and models from the image side R by one rule,
and the DP stage's schedule from the private set's size N and the target epsilon (`dp_plan`).

With k = log2(R / 32), R a power of two from 32 to 512:

* wavelet: Haar with L levels; the coarse band is C x C with C = 2 ** (floor(log2(R) / 2) + 1) (about 2 sqrt(R):
  enough pixels for shape and identity, few enough tokens to model under DP) and L = log2(R / C);
* tokenizer patches: 2 on the coarse band and on the coarsest detail band, doubling per finer level, so every
  scale is a (C/2) x (C/2) grid of tokens (mnist.py at 32 px and the paper configs at 256 px follow this rule);
* models: from the CPU demo's sizes at 32 px (mnist.py), per doubling of R the AR width grows by sqrt(2) (to a
  multiple of 64; heads of 32 channels, MLP 2x the width) and gains one layer, the tokenizer's width is half
  the AR width and the refiner's a quarter, the codebook doubles, and the code dimension is 8 below 128 px and 16
  from 128 px.

| R | levels | coarse | patch sizes | tokens | tokenizer | AR model | refiner |
|---|---|---|---|---|---|---|---|
| 32 | 2 | 8x8 | 2, 2, 4 | 16 / 48 | 256, 8, 64 | 128, 2, 4, 256 | 32, 32 |
| 64 | 2 | 16x16 | 2, 2, 4 | 64 / 192 | 512, 8, 96 | 192, 3, 6, 384 | 48, 48 |
| 128 | 3 | 16x16 | 2, 2, 4, 8 | 64 / 256 | 1024, 16, 128 | 256, 4, 8, 512 | 64, 64, 64 |
| 256 | 3 | 32x32 | 2, 2, 4, 8 | 256 / 1024 | 2048, 16, 192 | 384, 5, 12, 768 | 96, 96, 96 |
| 512 | 4 | 32x32 | 2, 2, 4, 8, 16 | 256 / 1280 | 4096, 16, 256 | 512, 6, 16, 1024 | 128, 128, 128, 128 |

tokens: coarse scale / all scales; tokenizer: codebook size, code dimension, width (depth 2); AR model: width,
depth, heads, MLP width; refiner: width per level (2 blocks). `table()` prints these rows from the rule
(tests/test_folder_config.py checks that they agree). dpwave models the coarse tokens only; full_dp all scales'
tokens. The paper configs (paper.py) use a ~0.3B-parameter AR model at 256 px.

The DP schedule (`dp_plan`): a compute budget of DP_EPOCHS = 75 passes over N (B x S = 75 N: the tuned shift
recipe's 1,024 x 150 on 2,000 digits), expected batches B = q N for q in SAMPLING_RATES (1/4, 1/2), ranked by the
planner by sigma / B (at a fixed budget, lower per-step noise wins: Sander et al. 2023; docs/tuning.md), sigma
calibrated to the target epsilon with the PLD accountant (the DP stage calibrates the same sigma again), and
delta = 1e-5 (below 1 / (10 N) beyond N = 10,000). Any N gets q = 1/2 and about 150 steps: sigma 3.17 at epsilon
10, 23.0 at epsilon 1. Epsilon inf and the public-only control take epsilon 10's batch and steps.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import ml_collections

from dpwave.privacy import planning

SIDES = (32, 64, 128, 256, 512)
SAMPLING_RATES = (1 / 4, 1 / 2)  # the planner's candidates q = B / N (the tuned recipe's q ~ 0.5)
DP_EPOCHS = 75  # the DP stage's budget B x S in passes over N (the tuned shift recipe's: 1,024 x 150 / 2,000)
REFERENCE_EPSILON = 10.0  # the plan of epsilon inf and of the public-only control (same batch and steps)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The sizes `sizes(side)` gives an R x R image."""

    side: int
    levels: int
    patch_sizes: tuple[int, ...]
    codebook_size: int
    code_dim: int
    tokenizer_width: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    refiner_widths: tuple[int, ...]

    @property
    def coarse(self) -> int:
        """Side of the coarse band."""
        return self.side // 2**self.levels

    @property
    def tokens(self) -> tuple[int, int]:
        """Tokens of the coarse scale and of all scales."""
        per_scale = (self.coarse // self.patch_sizes[0]) ** 2
        return per_scale, per_scale * len(self.patch_sizes)


def sizes(side: int) -> Sizes:
    """The rule of this module's docstring for an R x R image, R in SIDES."""
    if side not in SIDES:
        raise ValueError(f"image side {side} px: the sizing rule covers {SIDES}")
    k = int(math.log2(side // 32))
    coarse = 2 ** (int(math.log2(side)) // 2 + 1)
    levels = int(math.log2(side // coarse))
    width = 64 * round(2 * 2 ** (k / 2))
    return Sizes(side=side, levels=levels, patch_sizes=(2, *(2**i for i in range(1, levels + 1))),
                 codebook_size=256 * 2**k, code_dim=8 if k < 2 else 16, tokenizer_width=width // 2, width=width,
                 depth=2 + k, num_heads=width // 32, mlp_dim=2 * width, refiner_widths=(width // 4,) * levels)


def apply(config: ml_collections.ConfigDict, side: int) -> Sizes:
    """Writes `sizes(side)` into the config's wavelet, tokenizer, transformer and refiner sections."""
    s = sizes(side)
    config.data.image_size = side
    config.wavelet.update(name="haar", levels=s.levels, mode="symmetric")
    config.tokenizer.model.update(patch_sizes=s.patch_sizes, codebook_size=s.codebook_size, code_dim=s.code_dim,
                                  width=s.tokenizer_width, depth=2)
    config.transformer.update(width=s.width, depth=s.depth, num_heads=s.num_heads, mlp_dim=s.mlp_dim)
    config.refiner.model.update(widths=s.refiner_widths, num_blocks=2)
    return s


def table() -> str:
    """The rows of the docstring's table, from the rule."""
    def join(values: tuple[int, ...]) -> str:
        return ", ".join(map(str, values))

    rows = []
    for side in SIDES:
        s = sizes(side)
        rows.append(f"| {side} | {s.levels} | {s.coarse}x{s.coarse} | {join(s.patch_sizes)} | {s.tokens[0]} / "
                    f"{s.tokens[1]} | {s.codebook_size}, {s.code_dim}, {s.tokenizer_width} | {s.width}, {s.depth}, "
                    f"{s.num_heads}, {s.mlp_dim} | {join(s.refiner_widths)} |")
    return "\n".join(rows)


def delta(n: int) -> float:
    """1e-5, or a power of ten at most 1 / (10 N) for N above 10,000 (delta well below 1/N)."""
    return min(1e-5, 10.0 ** math.floor(math.log10(0.1 / n)))


@functools.cache  # ~1-3 s per candidate; config_flags reloads a config file as a new module, not this one
def dp_plan(target_epsilon: float, delta_: float, n: int, epochs: int) -> planning.Plan:
    """The planner's best schedule for N private images at `epochs` passes of compute (B x S = epochs x N), over the
    expected batches of SAMPLING_RATES, ranked by sigma / B (`planning.plan`, criterion effective_noise). Epsilon
    inf and the public-only control get the plan of REFERENCE_EPSILON."""
    epsilon = target_epsilon if 0 < target_epsilon < math.inf else REFERENCE_EPSILON
    batches = sorted({max(1, round(q * n)) for q in SAMPLING_RATES})
    return planning.plan(epsilon, delta_, n, epochs * n, batch_sizes=batches, criterion="effective_noise")[0]
