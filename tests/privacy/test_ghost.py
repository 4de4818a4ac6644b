"""Ghost norms: which leaves are handled without per-example gradients, and exactness."""

import jax
import jax.numpy as jnp
import numpy as np

from dpwave.privacy.clipping import clipped_grad
from dpwave.privacy.ghost import ghost_norms

RNG = jax.random.key(3)
# Leaves that enter the loss only through dot_generals without batch dims on the weight.
DENSE = {"rhs", "lhs", "tied", "in_jit", "seq", "multi"}
# Leaves used any other way: per-example gradients are materialized for them.
FALLBACK = {"bias", "mixed_layout", "other_use", "in_scan", "batched", "prod_a", "prod_b"}


def _zoo():
    shapes = {
        "rhs": (4, 6),
        "bias": (6,),
        "lhs": (6, 6),
        "tied": (6, 6),
        "mixed_layout": (6, 6),
        "other_use": (6, 3),
        "in_jit": (3, 5),
        "in_scan": (5, 5),
        "batched": (2, 5, 3),
        "seq": (3, 2),
        "multi": (2, 5, 4),
        "prod_a": (3, 3),
        "prod_b": (3, 3),
    }
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    params = {k: 0.5 * normal(*s) for k, s in sorted(shapes.items())}
    batch = {"x": normal(5, 4), "s": normal(5, 40, 3), "u": normal(5, 7, 2, 5)}

    def loss_fn(p, ex, rng):
        h = jnp.tanh(ex["x"] @ p["rhs"] + p["bias"])  # x W (gram: N = 1)
        h = jax.lax.dot_general(p["lhs"], h, (((1,), (0,)), ((), ())))  # W x
        h = jnp.tanh(jnp.tanh(h @ p["tied"]) @ p["tied"])  # one weight, two uses
        h = h @ p["mixed_layout"] + p["mixed_layout"] @ h  # two different layouts
        g = h @ p["other_use"] + jnp.sum(p["other_use"])  # also used elementwise
        g = g @ (p["prod_a"] @ p["prod_b"])  # weight times weight
        g = jax.jit(lambda a, w: jnp.tanh(a @ w))(g, p["in_jit"])  # inside a nested jit
        g, _ = jax.lax.scan(lambda c, _: (jnp.tanh(c @ p["in_scan"]), None), g, None, length=2)
        e = jnp.einsum("hd,hde->he", jnp.stack([g, 0.5 * g]), p["batched"])  # batch dim on weight
        s = jnp.tanh(ex["s"] @ p["seq"])  # N = 40 > K, M: direct
        m = jnp.einsum("tij,ijk->tk", ex["u"], p["multi"])  # two contracting dims
        jitter = 1.0 + 0.1 * jax.random.normal(rng, ())
        return jitter * (jnp.sum(e**2) + jnp.sum(s) + 0.1 * jnp.sum(m**2))

    return loss_fn, params, batch


def test_ghost_handles_exactly_the_dot_general_weights():
    loss_fn, params, batch = _zoo()
    keys = jax.vmap(lambda i: jax.random.fold_in(RNG, i))(jnp.arange(5))

    @jax.jit
    def run(params, batch, keys):
        res = ghost_norms(loss_fn, params, batch, keys)
        return res.fallback_grads, res.dense_sum(jnp.ones(5))

    fallback, summed = run(params, batch, keys)
    assert {k for k, v in fallback.items() if v is not None} == FALLBACK
    assert {k for k, v in summed.items() if v is not None} == DENSE
    for k in DENSE:
        assert summed[k].shape == params[k].shape


def test_ghost_equals_materialized_per_example_gradients():
    loss_fn, params, batch = _zoo()
    mask = jnp.array([1.0, 1.0, 0.0, 1.0, 1.0])
    ref, ref_aux = jax.jit(clipped_grad(loss_fn, l2_clip=13.0))(params, batch, mask, RNG)
    got, aux = jax.jit(clipped_grad(loss_fn, l2_clip=13.0, use_ghost_norms=True))(params, batch, mask, RNG)
    assert np.any(ref_aux.norms > 13.0) and np.any(ref_aux.norms < 13.0)
    np.testing.assert_allclose(aux.norms, ref_aux.norms, rtol=2e-5)
    np.testing.assert_allclose(aux.losses, ref_aux.losses, rtol=1e-6)
    for k in params:
        np.testing.assert_allclose(got[k], ref[k], rtol=2e-5, atol=1e-6, err_msg=k)


def test_dense_per_example_gradients_are_never_materialized():
    w = jnp.ones((64, 48))

    def loss_fn(p, x, rng):
        del rng
        return jnp.sum(jnp.tanh(x @ p["w"]))

    x = jnp.ones((5, 3, 64))
    text = lambda **kw: str(jax.make_jaxpr(clipped_grad(loss_fn, l2_clip=1.0, **kw))({"w": w}, x, jnp.ones(5), RNG))
    assert "f32[5,64,48]" in text()  # the vmap path holds B x |W| ...
    assert "f32[5,64,48]" not in text(use_ghost_norms=True)  # ... the ghost path never does


def test_dense_sums_have_exactly_the_reported_norms():
    # What DP needs: each example's contribution to the sum has the norm used to clip it.
    loss_fn, params, batch = _zoo()
    keys = jax.vmap(lambda i: jax.random.fold_in(RNG, i))(jnp.arange(5))

    @jax.jit
    def contributions(params, batch, keys):
        res = ghost_norms(loss_fn, params, batch, keys)
        each = jax.vmap(lambda w: res.dense_sum(w))(jnp.eye(5))
        sq = sum(jnp.sum(jnp.square(x).reshape(5, -1), axis=1) for x in jax.tree.leaves(each))
        return res.dense_sq_norms, sq

    reported, actual = contributions(params, batch, keys)
    np.testing.assert_allclose(actual, reported, rtol=1e-5)


def test_weights_cast_to_bfloat16_are_still_ghost_handled():
    rng = np.random.default_rng(1)
    params = {
        "w": jnp.asarray(rng.normal(size=(8, 6)), jnp.float32),
        "v": jnp.asarray(rng.normal(size=(6, 2)), jnp.float32),
    }
    x = jnp.asarray(rng.normal(size=(4, 5, 8)), jnp.float32)

    def loss_fn(p, example, key):
        del key
        bf = jnp.bfloat16
        h = jnp.tanh(example.astype(bf) @ p["w"].astype(bf))
        return jnp.sum(jnp.square((h @ p["v"].astype(bf)).astype(jnp.float32)))

    keys = jax.vmap(lambda i: jax.random.fold_in(RNG, i))(jnp.arange(4))

    @jax.jit
    def run(params):
        res = ghost_norms(loss_fn, params, x, keys)
        return res.fallback_grads, res.dense_sq_norms

    fallback, sq = run(params)
    assert fallback == {"w": None, "v": None}
    _, aux = jax.jit(clipped_grad(loss_fn, l2_clip=1.0))(params, x, jnp.ones(4), RNG)
    # The vmap path's weight gradients are bfloat16 matmuls; ghost sums them in float32.
    np.testing.assert_allclose(jnp.sqrt(sq), aux.norms, rtol=2e-2)
