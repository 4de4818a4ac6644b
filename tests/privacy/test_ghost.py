"""Ghost norms: which leaves are handled without per-example gradients, and exactness."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpwave.privacy.clipping import clipped_grad
from dpwave.privacy.ghost import ghost_norms
from dpwave.privacy.keys import example_keys

pytestmark = pytest.mark.unit

RNG = jax.random.key(3)
# Leaves that enter the loss only through dot_generals without batch dims on the weight, or only through
# lookups of whole rows (embedding tables: any index mode, repeated rows, constant indices).
# Stacked leaves sliced by a scan (one layer per iteration) are handled layer by layer.
DENSE = {"rhs", "lhs", "tied", "in_jit", "seq", "multi", "embed", "rows3d", "positions", "clipped", "filled",
         "conv", "conv_strided", "conv_nchw", "conv1d", "stacked", "stacked_table", "stacked_conv", "stacked_rev"}
# Leaves used any other way: per-example gradients are materialized for them.
FALLBACK = {"bias", "mixed_layout", "other_use", "in_scan", "batched", "prod_a", "prod_b", "looked_up_and_dot",
            "column_gather", "conv_grouped", "stacked_bias", "stacked_twice", "nested"}


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
        "embed": (8, 3),
        "rows3d": (5, 2, 3),
        "positions": (6, 3),
        "clipped": (8, 3),
        "filled": (8, 3),
        "looked_up_and_dot": (3, 3),
        "column_gather": (3, 4),
        "conv": (3, 3, 2, 4),  # HWIO
        "conv_strided": (3, 2, 4, 3),  # HWIO, strided, dilated input and kernel
        "conv_nchw": (2, 3, 3, 3),  # OIHW
        "conv1d": (3, 2, 2),  # WIO
        "conv_grouped": (3, 3, 1, 2),  # two feature groups
        "stacked": (3, 5, 5),  # three layers' weights, sliced by a scan
        "stacked_bias": (3, 5),
        "stacked_table": (3, 8, 5),
        "stacked_conv": (3, 3, 1, 1),  # WIO
        "stacked_twice": (3, 5, 5),  # a dot and an elementwise use in the body
        "stacked_rev": (2, 5, 5),  # a reversed scan
        "nested": (2, 2, 5, 5),  # a scan inside the scan
    }
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    params = {k: 0.5 * normal(*s) for k, s in sorted(shapes.items())}
    batch = {"x": normal(5, 4), "s": normal(5, 40, 3), "u": normal(5, 7, 2, 5),
             "ids": jnp.asarray(rng.integers(-3, 8, (5, 6)), jnp.int32),  # repeats; negatives wrap
             "img": normal(5, 1, 7, 6, 2), "sig": normal(5, 9, 2)}

    def loss_fn(p, ex, rng):
        h = jnp.tanh(ex["x"] @ p["rhs"] + p["bias"])  # x W (gram: N = 1)
        h = jax.lax.dot_general(p["lhs"], h, (((1,), (0,)), ((), ())))  # W x
        h = jnp.tanh(jnp.tanh(h @ p["tied"]) @ p["tied"])  # one weight, two uses
        h = h @ p["mixed_layout"] + p["mixed_layout"] @ h  # two different layouts
        g = h @ p["other_use"] + jnp.sum(p["other_use"])  # also used elementwise
        g = g @ (p["prod_a"] @ p["prod_b"])  # weight times weight
        g = jax.jit(lambda a, w: jnp.tanh(a @ w))(g, p["in_jit"])  # inside a nested jit
        g, _ = jax.lax.scan(lambda c, _: (jnp.tanh(c @ p["in_scan"]), None), g, None, length=2)

        def layer(c, w):
            c = jnp.tanh(c @ w["stacked"] + w["stacked_bias"])
            c = c + jnp.take(w["stacked_table"], jnp.abs(ex["ids"]) % 8, axis=0).sum(0)
            c = c + jax.lax.conv_general_dilated(c[None, :, None], w["stacked_conv"], (1,), "SAME",
                                                 dimension_numbers=("NWC", "WIO", "NWC")).reshape(5)
            return jnp.tanh(c @ w["stacked_twice"] * jnp.mean(w["stacked_twice"])), c[0]

        stacked = ("stacked", "stacked_bias", "stacked_table", "stacked_conv", "stacked_twice")
        g, firsts = jax.lax.scan(layer, g, {k: p[k] for k in stacked})
        g, _ = jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), g + jnp.sum(firsts), p["stacked_rev"], reverse=True)
        g, _ = jax.lax.scan(lambda c, w: (jax.lax.scan(lambda c2, w2: (jnp.tanh(c2 @ w2), None), c, w)[0], None), g,
                            p["nested"])
        e = jnp.einsum("hd,hde->he", jnp.stack([g, 0.5 * g]), p["batched"])  # batch dim on weight
        s = jnp.tanh(ex["s"] @ p["seq"])  # N = 40 > K, M: direct
        m = jnp.einsum("tij,ijk->tk", ex["u"], p["multi"])  # two contracting dims
        ids = ex["ids"]
        t = jnp.take(p["embed"], ids, axis=0) + p["positions"][jnp.arange(6)]  # constant indices
        t = t + jnp.take(p["clipped"], ids + 4, axis=0, mode="clip")  # rows past the end read the last
        t = t + jnp.take(p["filled"], ids + 2, axis=0, mode="fill", fill_value=0.0)  # past the end: no row
        t = t + p["rows3d"][jnp.abs(ids[:3]) % 5].reshape(6, 3)  # 2-D rows
        t = t + jnp.take(p["looked_up_and_dot"], jnp.abs(ids) % 3, axis=0) @ p["looked_up_and_dot"]
        t = t + jnp.take(p["column_gather"], jnp.abs(ids[:3]) % 4, axis=1).T.reshape(3, 3).sum(0)
        conv = lambda x, w, spec, **kw: jax.lax.conv_general_dilated(x, w, kw.pop("strides", (1, 1)),
                                                                     kw.pop("padding", "SAME"),
                                                                     dimension_numbers=spec, **kw)
        c = jnp.tanh(conv(ex["img"], p["conv"], ("NHWC", "HWIO", "NHWC")))  # (1, 7, 6, 4)
        c = jnp.tanh(conv(c, p["conv_strided"], ("NHWC", "HWIO", "NHWC"), strides=(2, 1), padding=((1, 2), (0, 1)),
                          lhs_dilation=(1, 2), rhs_dilation=(2, 1)))
        c = conv(jnp.transpose(c, (0, 3, 1, 2)), p["conv_nchw"], ("NCHW", "OIHW", "NCHW"))
        c = c + conv(jnp.transpose(ex["img"][:, ::2, ::2], (0, 3, 1, 2)), p["conv_grouped"], ("NCHW", "HWIO", "NCHW"),
                     feature_group_count=2).mean()
        c1 = conv(ex["sig"][None], p["conv1d"], ("NWC", "WIO", "NWC"), strides=(2,), padding="VALID")
        jitter = 1.0 + 0.1 * jax.random.normal(rng, ())
        return jitter * (jnp.sum(e**2) + jnp.sum(s) + 0.1 * jnp.sum(m**2) + jnp.sum(jnp.tanh(t) ** 2)
                         + jnp.sum(jnp.tanh(c) ** 2) + jnp.sum(c1**2))

    return loss_fn, params, batch


def test_ghost_handles_exactly_the_dot_general_weights():
    loss_fn, params, batch = _zoo()
    keys = example_keys(RNG, batch)

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
    ref, ref_aux = jax.jit(clipped_grad(loss_fn, l2_clip=40.0))(params, batch, mask, example_keys(RNG, batch))
    got, aux = jax.jit(clipped_grad(loss_fn, l2_clip=40.0, use_ghost_norms=True))(params, batch, mask,
                                                                                  example_keys(RNG, batch))
    assert np.any(ref_aux.norms > 40.0) and np.any(ref_aux.norms < 40.0)
    # Ghost norms are certified upper bounds, within 1e-4 of the materialized norms.
    assert np.all(aux.norms >= ref_aux.norms * (1 - 1e-6))
    np.testing.assert_allclose(aux.norms, ref_aux.norms, rtol=1e-4)
    np.testing.assert_allclose(aux.losses, ref_aux.losses, rtol=1e-6)
    for k in params:  # float32 rounding: relative to each leaf's largest entry
        atol = max(5e-5, 1e-5 * float(np.abs(ref[k]).max()))
        np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=atol, err_msg=k)


def test_dense_per_example_gradients_are_never_materialized():
    w = jnp.ones((64, 48))

    def loss_fn(p, x, rng):
        del rng
        return jnp.sum(jnp.tanh(x @ p["w"]))

    x = jnp.ones((5, 3, 64))
    text = lambda **kw: str(jax.make_jaxpr(clipped_grad(loss_fn, l2_clip=1.0, **kw))({"w": w}, x, jnp.ones(5),
                                                                                   example_keys(RNG, x)))
    assert "f32[5,64,48]" in text()  # the vmap path holds B x |W| ...
    assert "f32[5,64,48]" not in text(use_ghost_norms=True)  # ... the ghost path never does


def test_dense_sums_have_at_most_the_reported_norms():
    # What DP needs: each example's contribution to the sum has at most the norm used to clip it.
    loss_fn, params, batch = _zoo()
    keys = example_keys(RNG, batch)

    @jax.jit
    def contributions(params, batch, keys):
        res = ghost_norms(loss_fn, params, batch, keys)
        each = jax.vmap(lambda w: res.dense_sum(w))(jnp.eye(5))
        sq = sum(jnp.sum(jnp.square(x).reshape(5, -1), axis=1) for x in jax.tree.leaves(each))
        return res.dense_norms, jnp.sqrt(sq)

    reported, actual = contributions(params, batch, keys)
    assert np.all(actual <= reported)
    np.testing.assert_allclose(actual, reported, rtol=1e-4)


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

    keys = example_keys(RNG, x)

    @jax.jit
    def run(params):
        res = ghost_norms(loss_fn, params, x, keys)
        return res.fallback_grads, res.dense_norms

    fallback, norms = run(params)
    assert fallback == {"w": None, "v": None}
    _, aux = jax.jit(clipped_grad(loss_fn, l2_clip=1.0))(params, x, jnp.ones(4), keys)
    # The vmap path's weight gradients are bfloat16 matmuls; ghost sums them in float32.
    np.testing.assert_allclose(norms, aux.norms, rtol=2e-2)


def _cancelling_problem(scale: float, seed: int, k: int, m: int):
    """One dense layer; example 0 has two nearly parallel input rows of norm `scale` with opposite unit
    output cotangents, so its gradient (x1 - x2)^T c has norm 4 while the Gram entries are ~scale^2."""
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.normal(size=(k, m)), jnp.float32)
    x1 = rng.normal(size=k)
    x1 = scale * x1 / np.linalg.norm(x1)
    delta = rng.normal(size=k)
    x2 = x1 + 4.0 * delta / np.linalg.norm(delta)
    c = rng.normal(size=m)
    c = c / np.linalg.norm(c)
    xs = np.stack([np.stack([x1, x2])] + [rng.normal(size=(2, k)) for _ in range(3)])
    cs = np.stack([np.stack([c, -c])] + [rng.normal(size=(2, m)) for _ in range(3)])
    return {"w": w}, {"x": jnp.asarray(xs, jnp.float32), "c": jnp.asarray(cs, jnp.float32)}


def _cancelling_loss(dtype):
    def loss(p, ex, key):
        del key
        y = ex["x"].astype(dtype) @ p["w"].astype(dtype)  # the activations (and Y, dY) in `dtype`
        return jnp.sum((y * ex["c"].astype(dtype)).astype(jnp.float32))  # dL/dY = c exactly

    return loss


@pytest.mark.parametrize("dtype, ghost", [("float32", True), ("bfloat16", True), ("bfloat16", False)])
@pytest.mark.parametrize("k, m", [(64, 4), (256, 32)])
def test_cancelling_activations_add_at_most_c(k, m, dtype, ghost):
    # Before the certified bound, 21 of these 48 cases added up to 4 C in float32 (the Gram norm read 0).
    # With bfloat16 activations both paths already held on the first run of this test: X and D are cast to
    # float32 (exactly) for the bound and the sum; the vmap path sums the gradients it measured.
    fn = jax.jit(clipped_grad(_cancelling_loss(dtype), l2_clip=1.0, use_ghost_norms=ghost))
    for scale in (1e2, 1e3, 1e4):
        for seed in range(8):
            params, batch = _cancelling_problem(scale, seed, k, m)
            full, aux = fn(params, batch, jnp.ones(4), example_keys(RNG, batch))
            rest = jax.tree.map(lambda x: x[1:], batch)
            without, _ = fn(params, rest, jnp.ones(3), example_keys(RNG, rest))
            moved = float(jnp.linalg.norm(full["w"] - without["w"]))
            assert moved <= 1.0 + 1e-5, (scale, seed, moved, float(aux.norms[0]))
            # The exact norm of example 0's gradient at the values the model computes with (about 4 in
            # float32; bfloat16 rounding of the rows changes their difference).
            seen = lambda a: np.asarray(jnp.asarray(a[0]).astype(dtype), np.float64)
            exact = np.linalg.norm(seen(batch["x"]).T @ seen(batch["c"]))
            if ghost:
                assert float(aux.norms[0]) >= exact * (1 - 1e-6)


def test_cancelling_activations_in_scanned_layers_add_at_most_c():
    """The cancelling example of `_cancelling_problem` in each of two layers run by one scan over stacked weights:
    the per-layer bounds, added in squares, still never let it add more than C."""
    problems = [_cancelling_problem(1e4, seed, 64, 4) for seed in range(2)]
    params = {"w": jnp.stack([p["w"] for p, _ in problems])}
    batch = {name: jnp.stack([b[name] for _, b in problems], axis=1) for name in ("x", "c")}  # (4, 2 layers, ...)

    def loss(p, ex, key):
        del key
        layer = lambda total, slices: (total + jnp.sum((slices[1] @ slices[0]) * slices[2]), None)
        return jax.lax.scan(layer, 0.0, (p["w"], ex["x"], ex["c"]))[0]

    fn = jax.jit(clipped_grad(loss, l2_clip=1.0, use_ghost_norms=True))
    full, aux = fn(params, batch, jnp.ones(4), example_keys(RNG, batch))
    rest = jax.tree.map(lambda x: x[1:], batch)
    without, _ = fn(params, rest, jnp.ones(3), example_keys(RNG, rest))
    assert float(jnp.linalg.norm(full["w"] - without["w"])) <= 1.0 + 1e-5
    x, c = (np.asarray(batch[name][0], np.float64) for name in ("x", "c"))
    exact = np.linalg.norm(np.einsum("lnk,lnm->lkm", x, c))  # about 4 sqrt(2)
    assert float(aux.norms[0]) >= exact * (1 - 1e-6)


# (N, K, M) of one dense layer: the Gram formula when N (K + M) < K M, else X^T D (`ghost._norm_bound`).
BRANCHES = {"gram": (2, 64, 4), "direct": (40, 28, 28)}


def _contributions(branch: str, x_scale: float, c_scale: float, clip: float):
    """One dense layer, 4 examples with inputs of magnitude `x_scale` and output cotangents of magnitude
    `c_scale`: (norm of each example's contribution to the clipped sum, ClipAux, exact gradient norms)."""
    n, k, m = BRANCHES[branch]
    assert (n * (k + m) < k * m) == (branch == "gram")
    rng = np.random.default_rng(5)
    entries = lambda scale, *shape: scale * rng.choice([-1.0, 1.0], shape) * rng.uniform(0.5, 1.0, shape)
    params = {"w": jnp.asarray(rng.normal(size=(k, m)), jnp.float32)}
    batch = {"x": jnp.asarray(entries(x_scale, 4, n, k), jnp.float32),
             "c": jnp.asarray(entries(c_scale, 4, n, m), jnp.float32)}
    fn = jax.jit(clipped_grad(_cancelling_loss("float32"), l2_clip=clip, use_ghost_norms=True))
    keys = example_keys(RNG, batch)
    alone = lambda i: fn(params, batch, jnp.eye(4)[i], keys)[0]["w"]  # the others masked: weight exactly 0
    added = np.array([np.linalg.norm(np.asarray(alone(i), np.float64)) for i in range(4)])
    _, aux = fn(params, batch, jnp.ones(4), keys)
    x, c = (np.asarray(batch[name], np.float64) for name in ("x", "c"))
    return added, aux, np.linalg.norm(np.einsum("bnk,bnm->bkm", x, c), axis=(1, 2))


@pytest.mark.parametrize("x_scale, c_scale", [(1e-23, 1e17), (1e17, 1e-23)], ids=["tiny_x", "tiny_dy"])
@pytest.mark.parametrize("branch", sorted(BRANCHES))
def test_underflowing_squares_add_at_most_c(branch, x_scale, c_scale):
    """Inputs (or cotangents) of 1e-23, whose squares are 0 in float32, and gradients of norm 11 C to 110 C with
    C = 1e-6: before the power-of-two scaling every example read norm 0 and was added unclipped."""
    clip = 1e-6
    added, aux, exact = _contributions(branch, x_scale, c_scale, clip)
    assert np.all(exact > 10 * clip)
    assert np.all(added <= clip * (1 + 1e-5)), added / clip
    assert np.all(added >= clip * (1 - 1e-4)), added / clip  # clipped to C, not dropped
    assert np.all(aux.norms >= exact * (1 - 1e-6)) and np.all(aux.norms <= exact * (1 + 1e-4)), aux.norms / exact


@pytest.mark.parametrize("x_scale, c_scale", [(1e25, 1e-25), (1e-30, 1e23)], ids=["huge_x", "huge_dy"])
@pytest.mark.parametrize("branch", sorted(BRANCHES))
def test_overflowing_squares_give_the_norm_or_inf_never_nan(branch, x_scale, c_scale):
    """Entries whose squares overflow float32 read NaN before the scaling (the example was dropped): with a
    representable gradient the norm is now finite and tight; a gradient beyond float32 reads inf (zeroed)."""
    clip = 1e-6
    added, aux, exact = _contributions(branch, x_scale, c_scale, clip)
    assert int(aux.num_nonfinite) == 0
    assert np.all(aux.norms >= exact * (1 - 1e-6)) and np.all(aux.norms <= exact * (1 + 1e-4)), aux.norms / exact
    assert np.all(added <= clip * (1 + 1e-5)) and np.all(added >= clip * (1 - 1e-4)), added / clip
    added, aux, _ = _contributions(branch, 1e25, 1e25, clip)
    assert np.all(np.isposinf(aux.norms)) and int(aux.num_nonfinite) == 4 and np.all(added == 0)


def _lookup_contributions(c_scale: float, clip: float):
    """A table of 6 rows looked up 8 times per example (rows repeat), output cotangents `c` of magnitude
    `c_scale`; example 0 reads row 2 twice with opposite cotangents, so that row's gradient cancels exactly.
    Returns (norm of each example's contribution to the clipped sum, ClipAux, exact gradient norms)."""
    rng = np.random.default_rng(7)
    ids = rng.integers(0, 6, (4, 8))
    ids[0, :2] = 2
    c = c_scale * rng.choice([-1.0, 1.0], (4, 8, 3)) * rng.uniform(0.5, 1.0, (4, 8, 3))
    c[0, 1] = -c[0, 0]
    batch = {"ids": jnp.asarray(ids, jnp.int32), "c": jnp.asarray(c, jnp.float32)}
    params = {"table": jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)}

    def loss(p, ex, key):
        del key
        return jnp.sum(jnp.take(p["table"], ex["ids"], axis=0) * ex["c"])  # dL/dY = c exactly

    fn = jax.jit(clipped_grad(loss, l2_clip=clip, use_ghost_norms=True))
    keys = example_keys(RNG, batch)
    alone = lambda i: fn(params, batch, jnp.eye(4)[i], keys)[0]["table"]
    added = np.array([np.linalg.norm(np.asarray(alone(i), np.float64)) for i in range(4)])
    _, aux = fn(params, batch, jnp.ones(4), keys)
    grads = np.zeros((4, 6, 3))
    for b in range(4):
        np.add.at(grads[b], ids[b], np.asarray(batch["c"][b], np.float64))
    return added, aux, np.linalg.norm(grads.reshape(4, -1), axis=1)


@pytest.mark.parametrize("c_scale", [1e-30, 1.0, 1e30])
def test_looked_up_rows_add_at_most_c_at_any_scale(c_scale):
    """Embedding rows: repeated rows, a row whose two lookups cancel, and cotangents whose squares underflow or
    overflow float32: every contribution is clipped to C (never above), and the bound is tight."""
    clip = 1e-6 * c_scale
    added, aux, exact = _lookup_contributions(c_scale, clip)
    assert int(aux.num_nonfinite) == 0 and np.all(exact > 10 * clip)
    assert np.all(added <= clip * (1 + 1e-5)) and np.all(added >= clip * (1 - 1e-4)), added / clip
    assert np.all(aux.norms >= exact * (1 - 1e-6)) and np.all(aux.norms <= exact * (1 + 1e-4)), aux.norms / exact


@pytest.mark.parametrize("x_scale, c_scale", [(1.0, 1.0), (1e-23, 1e17), (1e17, 1e-23)],
                         ids=["unit", "tiny_x", "tiny_dy"])
def test_convolution_kernels_add_at_most_c_at_any_scale(x_scale, c_scale):
    """A 3x3 convolution (SAME padding) with inputs and output cotangents whose squares underflow float32: every
    contribution is clipped to C (never above), and the bound on the kernel's gradient norm is tight."""
    rng = np.random.default_rng(11)
    entries = lambda scale, *shape: scale * rng.choice([-1.0, 1.0], shape) * rng.uniform(0.5, 1.0, shape)
    x, c = entries(x_scale, 4, 6, 6, 2), entries(c_scale, 4, 6, 6, 3)
    batch = {"x": jnp.asarray(x, jnp.float32), "c": jnp.asarray(c, jnp.float32)}
    params = {"w": jnp.asarray(rng.normal(size=(3, 3, 2, 3)), jnp.float32)}

    def loss(p, ex, key):
        del key
        y = jax.lax.conv_general_dilated(ex["x"][None], p["w"], (1, 1), "SAME",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(y[0] * ex["c"])  # dL/dY = c exactly

    padded = np.pad(np.asarray(batch["x"], np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    cs = np.asarray(batch["c"], np.float64)
    exact = np.linalg.norm(np.stack([np.einsum("bhwi,bhwo->bio", padded[:, i:i + 6, j:j + 6], cs)
                                     for i in range(3) for j in range(3)], axis=1).reshape(4, -1), axis=1)
    clip = 1e-2 * float(exact.min())
    fn = jax.jit(clipped_grad(loss, l2_clip=clip, use_ghost_norms=True))
    keys = example_keys(RNG, batch)
    added = np.array([np.linalg.norm(np.asarray(fn(params, batch, jnp.eye(4)[i], keys)[0]["w"], np.float64))
                      for i in range(4)])
    _, aux = fn(params, batch, jnp.ones(4), keys)
    assert int(aux.num_nonfinite) == 0
    assert np.all(added <= clip * (1 + 1e-5)) and np.all(added >= clip * (1 - 1e-4)), added / clip
    assert np.all(aux.norms >= exact * (1 - 1e-6)) and np.all(aux.norms <= exact * (1 + 1e-4)), aux.norms / exact


def test_the_transformers_embedding_tables_are_ghost_handled():
    """Token, position and class embeddings (row lookups) have no per-example gradients: only the biases, the
    norms' scales and the BOS vector do."""
    loss_fn, params, batch = _demo_transformer("float32")
    keys = example_keys(RNG, batch)
    fallback = jax.eval_shape(lambda p: ghost_norms(loss_fn, p, batch, keys).fallback_grads, params)
    names = {jax.tree_util.keystr(k) for k, v in jax.tree_util.tree_leaves_with_path(fallback)}
    assert names and not any("embed" in n or "kernel" in n for n in names), names
    assert all(any(part in n for part in ("bias", "scale", "bos")) for n in names), names


def test_custom_vjp_without_weights_passes_through():
    """An activation with its own VJP (as cuDNN attention is) between two dense layers: both stay ghost-handled."""

    @jax.custom_vjp
    def act(x):
        return jnp.tanh(x)

    act.defvjp(lambda x: (jnp.tanh(x), x), lambda x, g: (g * (1 - jnp.tanh(x) ** 2),))
    rng = np.random.default_rng(2)
    params = {"a": jnp.asarray(rng.normal(size=(6, 8)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)}
    x = jnp.asarray(rng.normal(size=(5, 4, 6)), jnp.float32)

    def loss_fn(p, example, key):
        del key
        return jnp.sum(jnp.square(act(example @ p["a"]) @ p["b"]))

    keys = example_keys(RNG, x)
    fallback = jax.jit(lambda p: ghost_norms(loss_fn, p, x, keys).fallback_grads)(params)
    assert fallback == {"a": None, "b": None}
    _, ref = jax.jit(clipped_grad(loss_fn, l2_clip=1.0))(params, x, jnp.ones(5), keys)
    _, got = jax.jit(clipped_grad(loss_fn, l2_clip=1.0, use_ghost_norms=True))(params, x, jnp.ones(5), keys)
    assert np.all(got.norms >= ref.norms * (1 - 1e-6))
    np.testing.assert_allclose(got.norms, ref.norms, rtol=1e-4)


def _demo_transformer(dtype: str = "float32", caption: bool = False, **overrides):
    """The demo's transformer (randomly initialized) with `dtype` activations, a batch of 6 and its loss.

    `caption`: conditioned on 8 caption bytes (a masked attention prefix; one caption empty) instead of labels.
    """
    import dataclasses

    from dpwave.models import transformer as transformer_lib
    from dpwave.models.text import encode_captions
    from dpwave.train import ar_examples, settings
    from experiments.configs import mnist

    if caption:
        overrides = dict(overrides, num_classes=None, max_text_len=8, text_depth=1)
    config = dataclasses.replace(settings.read(mnist.get_config("demo")).transformer, dtype=dtype, **overrides)
    graphdef, params = ar_examples.init_transformer(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = {"tokens": jnp.asarray(rng.integers(0, config.vocab_size, (6, config.seq_len)), jnp.int32)}
    if caption:
        batch["caption_bytes"] = jnp.asarray(encode_captions(["a 7", "", "two", "a five", "0", "nine!"], 8))
    else:
        batch["label"] = jnp.asarray(rng.integers(0, 10, 6), jnp.int32)
    return (lambda p, ex, key: transformer_lib.per_example_loss(graphdef, p, ex, key)), params, batch


def test_bfloat16_dense_sums_have_at_most_the_reported_norms():
    """bfloat16 activations: each example's weight-gradient contribution to the sum stays within its bound."""
    loss_fn, params, batch = _demo_transformer("bfloat16")
    keys = example_keys(RNG, batch)

    @jax.jit
    def contributions(params):
        res = ghost_norms(loss_fn, params, batch, keys)
        each = jax.vmap(res.dense_sum)(jnp.eye(6))
        sq = sum(jnp.sum(jnp.square(x).reshape(6, -1), axis=1) for x in jax.tree.leaves(each))
        return res.dense_norms, jnp.sqrt(sq)

    reported, actual = contributions(params)
    assert np.all(actual <= reported)
    np.testing.assert_allclose(actual, reported, rtol=5e-4)


def test_ghost_traces_through_cudnn_attention(monkeypatch):
    """attention_impl='cudnn' (a custom_vjp around cuDNN calls): traced, not run, on a machine without cuDNN by
    pretending its version; every dense kernel stays ghost-handled."""
    fused = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
    monkeypatch.setattr(fused, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(fused, "check_compute_capability", lambda capability: True)
    monkeypatch.setattr(fused, "is_cuda_compute_capability_equal", lambda capability: False)
    loss_fn, params, batch = _demo_transformer("bfloat16", attention_impl="cudnn")
    keys = example_keys(RNG, batch)
    fallback = jax.eval_shape(lambda p: ghost_norms(loss_fn, p, batch, keys).fallback_grads, params)
    leaves = jax.tree_util.tree_leaves_with_path(fallback, is_leaf=lambda v: v is None)
    kernels = [v for k, v in leaves if "kernel" in jax.tree_util.keystr(k)]
    assert len(kernels) == 4 * 2 + 2 * 2 + 1 and all(v is None for v in kernels)  # q k v o, fc1 fc2, head
    step = jax.make_jaxpr(clipped_grad(loss_fn, l2_clip=1.0, use_ghost_norms=True))(params, batch, jnp.ones(6), keys)
    assert "dot_product_attention_fwd_wrapper" in str(step) and "dot_product_attention_bwd_wrapper" in str(step)


# Tightness is utility, not the guarantee (the bounds themselves are tested above); the caption model is slow.
@pytest.mark.parametrize("caption", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["label", "caption"])
def test_norm_bounds_are_tight_on_the_demo_transformer(caption):
    """On a real model the certified bound stays within 1e-4 of the materialized per-example norm."""
    loss_fn, params, batch = _demo_transformer(caption=caption)
    keys = example_keys(RNG, batch)
    _, ref = jax.jit(clipped_grad(loss_fn, l2_clip=1.0))(params, batch, jnp.ones(6), keys)
    _, got = jax.jit(clipped_grad(loss_fn, l2_clip=1.0, use_ghost_norms=True))(params, batch, jnp.ones(6), keys)
    ratio = np.asarray(got.norms) / np.asarray(ref.norms)
    assert np.all(ratio >= 1 - 1e-6) and np.all(ratio <= 1 + 1e-4), ratio
