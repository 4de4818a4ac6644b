"""clipped_grad: sensitivity, padding, microbatching, non-finite rows, trainable subsets, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers.dp_models import attention_problem, clip_and_sum, mlp_problem, reference_clipped_sum

from dpwave.privacy.clipping import clip_factors, clipped_grad, combine, partition
from dpwave.privacy.keys import example_keys

pytestmark = pytest.mark.unit

RNG = jax.random.key(7)
BATCH = 6
# (problem builder, clip norm C): C lies inside the range of per-example norms of seed 1, so
# some rows are clipped and some are not (asserted below).
PROBLEMS = {"mlp": (mlp_problem, 9.0), "attention": (attention_problem, 2.6)}
PATHS = pytest.mark.parametrize("ghost", [False, True], ids=["vmap", "ghost"])


@functools.cache
def _setup(name: str, ghost: bool):
    """(problem, jitted clipped_grad): cached so each XLA program compiles once per file."""
    build, clip = PROBLEMS[name]
    loss_fn, params, batch = build(seed=1, batch=BATCH)
    fn = jax.jit(clipped_grad(loss_fn, l2_clip=clip, use_ghost_norms=ghost))
    return loss_fn, params, batch, clip, fn


def _tree_norm(tree) -> float:
    return float(jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree))))


def _tree_allclose(a, b, atol=1e-5, rtol=1e-5) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=rtol)


@PATHS
@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_matches_per_example_loop_definition(name, ghost):
    loss_fn, params, batch, clip, fn = _setup(name, ghost)
    mask = jnp.array([1.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    ref_sum, ref_norms = reference_clipped_sum(loss_fn, params, batch, mask, example_keys(RNG, batch), clip)
    assert np.any(ref_norms > clip) and np.any(ref_norms < clip)
    got, aux = fn(params, batch, mask, example_keys(RNG, batch))
    _tree_allclose(got, ref_sum)
    np.testing.assert_allclose(aux.norms, ref_norms, rtol=1e-5)
    np.testing.assert_array_equal(aux.clipped, np.asarray(ref_norms) > clip)  # the DP step's clipped fraction
    assert int(aux.num_nonfinite) == 0


@PATHS
@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_removing_one_example_moves_the_sum_by_at_most_c(name, ghost):
    _, params, batch, clip, fn = _setup(name, ghost)
    full, aux = fn(params, batch, jnp.ones(BATCH), example_keys(RNG, batch))
    for i in range(BATCH):
        keep = np.array([j for j in range(BATCH) if j != i])
        # The neighbouring dataset without example i: the others keep their content-derived keys.
        smaller = jax.tree.map(lambda x: x[keep], batch)
        fewer, _ = fn(params, smaller, jnp.ones(BATCH - 1), example_keys(RNG, smaller))
        moved = _tree_norm(jax.tree.map(jnp.subtract, full, fewer))
        assert moved <= clip * (1 + 1e-5)
        np.testing.assert_allclose(moved, min(float(aux.norms[i]), clip), rtol=1e-4)


@PATHS
def test_padding_rows_change_nothing(ghost):
    _, params, batch, _, fn = _setup("mlp", ghost)
    real = jax.tree.map(lambda x: x[: BATCH - 1], batch)
    junk = {"x": jnp.full((1, 5), jnp.nan), "y": jnp.full((1, 3), 1e30)}
    padded = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), real, junk)
    base, aux = fn(params, real, jnp.ones(BATCH - 1), example_keys(RNG, real))
    got, aux_pad = fn(params, padded, jnp.array([1.0] * (BATCH - 1) + [0.0]), example_keys(RNG, padded))
    _tree_allclose(got, base, atol=1e-7, rtol=1e-6)
    assert int(aux_pad.num_nonfinite) == 0
    np.testing.assert_allclose(aux_pad.norms[:-1], aux.norms, rtol=1e-6)
    np.testing.assert_allclose(aux_pad.losses[:-1], aux.losses, rtol=1e-6)


def test_microbatched_equals_whole_batch_with_per_example_rngs():
    loss_fn, params, batch = mlp_problem(seed=4, batch=8, noisy=True)
    mask = jnp.array([1, 1, 0, 1, 1, 1, 0, 1], jnp.float32)
    run = lambda rng=RNG, **kw: jax.jit(clipped_grad(loss_fn, l2_clip=0.5, **kw))(
        params, batch, mask, example_keys(rng, batch)
    )
    whole, aux = run()
    # The rng draws matter, so the equalities below prove chunks use each example's own key.
    other, _ = run(jax.random.key(8))
    assert _tree_norm(jax.tree.map(jnp.subtract, whole, other)) > 1e-3
    for kwargs in (dict(microbatch_size=3), dict(use_ghost_norms=True), dict(microbatch_size=4, use_ghost_norms=True)):
        chunked, aux_mb = run(**kwargs)
        _tree_allclose(chunked, whole)
        np.testing.assert_allclose(aux_mb.norms, aux.norms, rtol=1e-5)
        np.testing.assert_allclose(aux_mb.losses, aux.losses, rtol=1e-5)


@PATHS
@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_nonfinite_example_is_zeroed_and_counted(bad, ghost):
    _, params, batch, _, fn = _setup("mlp", ghost)
    poisoned = {"x": batch["x"].at[2, 1].set(bad), "y": batch["y"]}
    got, aux = fn(params, poisoned, jnp.ones(BATCH), example_keys(RNG, batch))
    expected, _ = fn(params, batch, jnp.array([1, 1, 0, 1, 1, 1.0]), example_keys(RNG, batch))
    assert int(aux.num_nonfinite) == 1
    assert not np.isfinite(aux.norms[2])
    _tree_allclose(got, expected, atol=0, rtol=0)


@PATHS
@pytest.mark.parametrize("scale, clip", [(1e-23, 1e-23), (1e20, 1.0)], ids=["underflow", "overflow"])
def test_gradients_whose_squares_under_or_overflow_are_clipped(scale, clip, ghost):
    """Per-example gradient entries of 1e-23 (squares 0 in float32) or 1e20 (squares inf): before the
    power-of-two scaling the first read norm 0 and were added unclipped (12 C), the second were dropped."""
    rng = np.random.default_rng(3)
    grads = jnp.asarray(scale * rng.choice([-1.0, 1.0], (4, 16, 16)) * rng.uniform(0.5, 1.0, (4, 16, 16)), jnp.float32)
    fn = jax.jit(clipped_grad(lambda p, g, key: jnp.sum(p["w"] * g), l2_clip=clip, use_ghost_norms=ghost))
    params, keys = {"w": jnp.zeros((16, 16))}, example_keys(RNG, grads)
    exact = np.linalg.norm(np.asarray(grads, np.float64).reshape(4, -1), axis=1)
    assert np.all(exact > 10 * clip)
    for i in range(4):
        added = np.linalg.norm(np.asarray(fn(params, grads, jnp.eye(4)[i], keys)[0]["w"], np.float64))
        assert clip * (1 - 1e-5) <= added <= clip * (1 + 1e-5), added / clip
    _, aux = fn(params, grads, jnp.ones(4), keys)
    np.testing.assert_allclose(aux.norms, exact, rtol=1e-5)
    assert int(aux.num_nonfinite) == 0


def test_clip_factors_below_the_normal_range_drop_the_example():
    # C / norm below 2^-126 would be a subnormal factor, rounded with up to 2x relative error where the
    # hardware keeps subnormals: that example is dropped and counted instead.
    weights, usable = clip_factors(jnp.array([1e38, 2.0, 1e30]), jnp.ones(3), 1e-6)
    np.testing.assert_array_equal(usable, [False, True, True])
    assert float(weights[0]) == 0.0
    np.testing.assert_allclose(weights[1:], [5e-7, 1e-36], rtol=1e-6)


def _dict_mlp():
    """A plain-dict MLP whose params include an integer table: it cannot be differentiated."""
    rng = np.random.default_rng(6)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    params = {
        "l1": {"kernel": normal(5, 7), "bias": jnp.zeros(7)},
        "l2": {"kernel": normal(7, 3), "bias": jnp.ones(3)},
        "table": jnp.arange(3),
    }
    batch = {"x": normal(4, 5), "y": normal(4, 3)}

    def loss_fn(p, example, rng):
        del rng
        h = jnp.tanh(example["x"] @ p["l1"]["kernel"] + p["l1"]["bias"])
        pred = h @ p["l2"]["kernel"] + p["l2"]["bias"] + p["table"].astype(jnp.float32)
        return jnp.sum(jnp.square(pred - example["y"]))

    return loss_fn, params, batch


@PATHS
def test_trainable_subset_differentiates_only_trainable_leaves(ghost):
    loss_fn, params, batch = _dict_mlp()
    mask, keys = jnp.ones(4), example_keys(RNG, batch)
    with pytest.raises(TypeError):  # proves the int leaf is never differentiated below
        clipped_grad(loss_fn, l2_clip=1.0)(params, batch, mask, keys)
    only_l2 = lambda path: path[0] == "l2"
    sub, _ = jax.jit(clipped_grad(loss_fn, l2_clip=1e6, trainable=only_l2, use_ghost_norms=ghost))(
        params, batch, mask, keys
    )
    assert sub["l1"] == {"kernel": None, "bias": None} and sub["table"] is None
    float_only = lambda path: path[0] != "table"
    full, _ = jax.jit(clipped_grad(loss_fn, l2_clip=1e6, trainable=float_only))(params, batch, mask, keys)
    _tree_allclose(sub["l2"], full["l2"])  # no clipping active: the restricted full gradient
    assert all(float(jnp.max(jnp.abs(x))) > 0 for x in jax.tree.leaves(sub))

    # With clipping active the norm is taken over the trainable leaves only.
    flags = {"l1": {"kernel": False, "bias": False}, "l2": {"kernel": True, "bias": True}, "table": False}
    train, frozen = partition(params, flags)
    clipped, aux = jax.jit(clipped_grad(loss_fn, l2_clip=0.2, trainable=flags, use_ghost_norms=ghost))(
        params, batch, mask, keys
    )
    ref, ref_norms = reference_clipped_sum(
        lambda p, e, r: loss_fn(combine(p, frozen), e, r), train, batch, mask, keys, 0.2
    )
    _tree_allclose(clipped, ref)
    np.testing.assert_allclose(aux.norms, ref_norms, rtol=1e-5)
    merged = combine(jax.tree.map(lambda p, g: p - g, train, clipped), frozen)
    assert merged["table"] is params["table"]
    np.testing.assert_allclose(merged["l2"]["kernel"], params["l2"]["kernel"] - clipped["l2"]["kernel"])


def test_clip_and_sum_on_materialized_grads():
    grads = {"a": jnp.array([[3.0, 4.0], [0.3, 0.4], [jnp.nan, 1.0], [6.0, 8.0]])}
    # The mask is binarized: a weight of 2 cannot double an example's contribution.
    total, norms, nonfinite = clip_and_sum(grads, jnp.array([2, 1, 1, 0]), 1.0)
    np.testing.assert_allclose(total["a"], [0.6 + 0.3, 0.8 + 0.4], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(norms)[[0, 1, 3]], [5.0, 0.5, 10.0], rtol=1e-6)
    assert int(nonfinite) == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(l2_clip=0.0), "l2_clip"),
        (dict(l2_clip=-1.0), "l2_clip"),
        (dict(l2_clip=float("nan")), "l2_clip"),
        (dict(l2_clip=1.0, microbatch_size=0), "microbatch"),
        (dict(l2_clip=1.0, microbatch_size=2.5), "microbatch"),
    ],
)
def test_bad_settings_raise(kwargs, match):
    loss_fn, _, _ = _dict_mlp()
    with pytest.raises(ValueError, match=match):
        clipped_grad(loss_fn, **kwargs)


def test_bad_inputs_raise():
    loss_fn, params, batch = _dict_mlp()
    fn = clipped_grad(loss_fn, l2_clip=1.0, trainable=lambda path: path[0] != "table")
    keys = example_keys(RNG, batch)
    with pytest.raises(ValueError, match="leading axis 3"):
        fn(params, batch, jnp.ones(3), keys)
    with pytest.raises(ValueError, match="shape"):
        fn(params, batch, jnp.ones((4, 1)), keys)
    with pytest.raises(ValueError, match="one per example"):
        fn(params, batch, jnp.ones(4), RNG)
    with pytest.raises(ValueError, match="selects no parameter"):
        clipped_grad(loss_fn, l2_clip=1.0, trainable=lambda path: False)(params, batch, jnp.ones(4), keys)
    with pytest.raises(ValueError, match="structure of params"):
        clipped_grad(loss_fn, l2_clip=1.0, trainable={"l1": True})(params, batch, jnp.ones(4), keys)
