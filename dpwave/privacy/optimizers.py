"""The DP optimizer: `optax.chain(privatize, inner)` for any inner Optax optimizer.

`privatize` (`noise.noise_and_normalize`) takes the SUM of clipped per-example gradients
(`clipping.clipped_grad`), adds the Gaussian noise once and divides by the expected batch size; `inner` (SGD,
Adam, AdamW, ...) then sees the noised mean, which is post-processing and costs no privacy.
`optax.contrib.differentially_private_aggregate` is not used: it takes materialized per-example gradients and
divides by the realized batch size, which is private under Poisson sampling.
"""

import jax
import optax

from dpwave.privacy.noise import noise_and_normalize

# Stream id folded into jax.random.key(DP secret seed) for the noise key, so the noise never reuses the keys
# other components derive from the same seed (the DP step's per-example stream, fold_in(key(seed), step)).
NOISE_STREAM = 0x6E6F6973  # "nois"


def noise_key(seed: int) -> jax.Array:
    """The noise stream's key for a DP secret seed: fold_in(key(seed), NOISE_STREAM)."""
    return jax.random.fold_in(jax.random.key(seed), NOISE_STREAM)


def dp_optimizer(inner: optax.GradientTransformation, *, l2_clip: float, noise_multiplier: float,
                 expected_batch_size: float, key: int | jax.Array) -> optax.GradientTransformationExtraArgs:
    """`optax.chain(noise_and_normalize(...), inner)`: DP-SGD with `inner = optax.sgd(lr)`, DP-Adam with
    `optax.adam(lr)`, and so on. Its `update` takes the clipped sum (noise_multiplier 0: the non-private
    reference, still clipped and normalized)."""
    privatize = noise_and_normalize(l2_clip=l2_clip, noise_multiplier=noise_multiplier,
                                    expected_batch_size=expected_batch_size, key=key)
    return optax.chain(privatize, inner)
