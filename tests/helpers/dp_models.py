"""Small Flax NNX models, per-example losses and the clipping oracle shared by the privacy tests."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpwave.privacy.clipping import clip_factors, per_example_norms, weighted_sum

VOCAB, SEQ, WIDTH, HEADS = 23, 6, 16, 2


class MLP(nnx.Module):
    """Two dense layers with biases on a vector input."""

    def __init__(self, din: int = 5, hidden: int = 7, dout: int = 3, *, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(din, hidden, rngs=rngs)
        self.l2 = nnx.Linear(hidden, dout, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.l2(jnp.tanh(self.l1(x)))


class TinyAttention(nnx.Module):
    """Embedding, layer norm, multi-dim q/k/v projection, softmax attention, dropout, head."""

    def __init__(self, *, rngs: nnx.Rngs, dropout: float = 0.0):
        self.emb = nnx.Embed(VOCAB, WIDTH, rngs=rngs)
        self.ln = nnx.LayerNorm(WIDTH, rngs=rngs)
        self.qkv = nnx.LinearGeneral(WIDTH, (3, HEADS, WIDTH // HEADS), rngs=rngs)
        self.out = nnx.LinearGeneral((HEADS, WIDTH // HEADS), WIDTH, axis=(-2, -1), rngs=rngs)
        self.head = nnx.Linear(WIDTH, VOCAB, rngs=rngs)
        self.rate = dropout

    def __call__(self, tokens: jax.Array, rng: jax.Array) -> jax.Array:
        h = self.emb(tokens)
        q, k, v = jnp.moveaxis(self.qkv(self.ln(h)), -3, 0)
        att = jax.nn.softmax(jnp.einsum("thd,shd->hts", q, k) / jnp.sqrt(q.shape[-1]), axis=-1)
        y = self.out(jnp.einsum("hts,shd->thd", att, v))
        if self.rate:
            y = y * jax.random.bernoulli(rng, 1 - self.rate, y.shape) / (1 - self.rate)
        return self.head(h + y)


def mlp_problem(seed: int = 0, batch: int = 8, noisy: bool = False):
    """(loss_fn, params, batch) for a squared-error MLP; `noisy` jitters outputs with the rng."""
    model = MLP(rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(seed + 100)
    data = {
        "x": jnp.asarray(rng.normal(size=(batch, 5)), jnp.float32),
        "y": jnp.asarray(rng.normal(size=(batch, 3)), jnp.float32),
    }

    def loss_fn(p, example, rng):
        pred = nnx.merge(graphdef, p)(example["x"])
        if noisy:
            pred = pred * (1.0 + 0.5 * jax.random.normal(rng, pred.shape))
        return jnp.sum(jnp.square(pred - example["y"]))

    return loss_fn, params, data


def attention_problem(seed: int = 0, batch: int = 8, dropout: float = 0.0):
    """(loss_fn, params, batch) for next-token cross-entropy of TinyAttention."""
    model = TinyAttention(rngs=nnx.Rngs(seed), dropout=dropout)
    graphdef, params = nnx.split(model, nnx.Param)
    tokens = jnp.asarray(np.random.default_rng(seed + 100).integers(0, VOCAB, (batch, SEQ + 1)), jnp.int32)

    def loss_fn(p, example, rng):
        logits = nnx.merge(graphdef, p)(example[:-1], rng)
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, example[1:, None], axis=-1))

    return loss_fn, params, tokens


def reference_clipped_sum(loss_fn, params, batch, mask, keys, l2_clip):
    """Plain per-example loop: grad, global norm, clip, sum (the definition, no vmap tricks)."""

    @jax.jit
    def one(example, key, m):
        g = jax.grad(loss_fn)(params, example, key)
        norm = jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(g)))
        return jax.tree.map(lambda x: m * jnp.minimum(1.0, l2_clip / norm) * x, g), norm

    total, norms = None, []
    for i in range(len(mask)):
        scaled, norm = one(jax.tree.map(lambda x: x[i], batch), keys[i], mask[i])
        scaled = jax.tree.map(np.asarray, scaled)
        total = scaled if total is None else jax.tree.map(np.add, total, scaled)
        norms.append(float(norm))
    return total, np.array(norms)


def clip_and_sum(per_example_grads, mask: jax.Array, l2_clip: float):
    """The oracle of `clipped_grad`: clips materialized per-example gradients (leading axis B) and sums the valid
    ones; returns (grad_sum, norms, num_nonfinite)."""
    norms = per_example_norms(per_example_grads)
    weights, finite = clip_factors(norms, mask, l2_clip)
    num_nonfinite = jnp.sum((mask != 0) & ~finite).astype(jnp.int32)
    return weighted_sum(per_example_grads, weights), norms, num_nonfinite
