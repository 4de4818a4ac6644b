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


def dp_optimizer(inner: optax.GradientTransformation, *, l2_clip: float, noise_multiplier: float,
                 expected_batch_size: float, key: int | jax.Array,
                 mask_key: jax.Array | None = None) -> optax.GradientTransformationExtraArgs:
    """`optax.chain(noise_and_normalize(...), inner)`: DP-SGD with `inner = optax.sgd(lr)`, DP-Adam with
    `optax.adam(lr)`, and so on. Its `update` takes the clipped sum (noise_multiplier 0: the non-private
    reference, still clipped and normalized). The DP stage's keys: `DpSecret.noise_keys()`."""
    privatize = noise_and_normalize(l2_clip=l2_clip, noise_multiplier=noise_multiplier,
                                    expected_batch_size=expected_batch_size, key=key, mask_key=mask_key)
    return optax.chain(privatize, inner)
