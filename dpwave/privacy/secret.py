"""The DP secret and the randomness streams derived from it.

A `DpSecret` is an integer of up to 256 bits with the number of bits it was given with. Every stream is a
function of ALL its bits, through HMAC-SHA256 keyed by its canonical 32 bytes (never by passing an int to
`jax.random.key`, which keeps only the low 32 bits when 64-bit mode is off):

* `noise_keys()`: two threefry keys, 64 bits each, from one 256-bit HMAC output. The DP noise is drawn by XLA's
  threefry bit generator keyed by the first with its counter starting at the second
  (`noise.noise_and_normalize(key=..., mask_key=...)`), so recovering it means finding both: 2^128 candidates.
* `step_key()`: the threefry key (64 bits) of the DP step's per-example randomness (condition dropout). Its
  secrecy is not part of the guarantee: the clipped sum moves by at most C for EVERY fixed step key
  (`dpwave.privacy.keys`).
* `poisson_seed()`: the secret integer itself, which the Poisson sampler feeds whole into numpy's SeedSequence
  (whose 128-bit pool keys a Philox generator): every bit counts, and a run started before this module existed
  draws the same batches.
* `commitment()`: HMAC-SHA256 of a fixed message, stored in checkpoints instead of the secret.

A new run needs at least `MIN_SECRET_BITS`; a shorter (legacy 62-bit) secret only resumes the run it started,
and `reproducible=True` marks a secret set in the config (NOT secret, any size).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac

import jax
import jax.numpy as jnp
import numpy as np

from dpwave.privacy.batch_selection import seed_commitment
from dpwave.validation import int_in_range

MIN_SECRET_BITS = 128
SECRET_BITS = 256  # what dpwave draws
_SECRET_BYTES = SECRET_BITS // 8
_DERIVATION = b"dpwave.DpSecret/v2/"


@dataclasses.dataclass(frozen=True, repr=False)
class DpSecret:
    """A secret integer in [0, 2^256) and the number of bits it was given with (its hex digits x 4, or 62 for a
    legacy decimal seed). `repr` never shows the value."""

    value: int
    bits: int
    reproducible: bool = False

    def __post_init__(self) -> None:
        int_in_range("secret value", self.value, 0, 2**SECRET_BITS - 1)
        int_in_range("secret bits", self.bits, 1, SECRET_BITS)

    def __repr__(self) -> str:
        return f"DpSecret(<{self.bits} bits{', reproducibility mode' if self.reproducible else ''}>)"

    @property
    def strong(self) -> bool:
        """At least MIN_SECRET_BITS bits (or reproducibility mode, which claims no secrecy)."""
        return self.bits >= MIN_SECRET_BITS or self.reproducible

    def stream_bytes(self, stream: str) -> bytes:
        """32 bytes of stream `stream`: HMAC-SHA256 keyed by the secret's canonical 32 bytes."""
        key = self.value.to_bytes(_SECRET_BYTES, "big")
        return hmac.new(key, _DERIVATION + stream.encode("ascii"), hashlib.sha256).digest()

    def _threefry_keys(self, stream: str, count: int) -> jax.Array:
        words = np.frombuffer(self.stream_bytes(stream), dtype=">u4")[:2 * count].astype(np.uint32)
        return jax.random.wrap_key_data(jnp.asarray(words.reshape(count, 2)), impl="threefry2x32")

    def noise_keys(self) -> tuple[jax.Array, jax.Array]:
        """(key, mask_key) of the noise: the optimizer state holds the first; the second is derived again at every
        start and never written."""
        keys = self._threefry_keys("noise", 2)
        return keys[0], keys[1]

    def step_key(self) -> jax.Array:
        """The key of the DP step's per-example randomness (before folding in the step)."""
        return self._threefry_keys("per-example", 1)[0]

    def poisson_seed(self) -> int:
        """The Poisson sampler's seed: the whole secret."""
        return self.value

    def commitment(self) -> str:
        """What checkpoints store instead of the secret (`batch_selection.seed_commitment`)."""
        return seed_commitment(self.value)
