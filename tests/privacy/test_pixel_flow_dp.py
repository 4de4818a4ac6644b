"""The dp_diffusion baseline's DP step keeps the sensitivity the accountant assumes: the pixel flow model's loss
draws its noise level, noise and label drop per example from the example's own content key, so adding one example
anywhere in the batch moves the clipped sum by at most C (both clipping paths; ghost norms handle the convolution
kernels from their input patches, the label table as row lookups)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dpwave import privacy
from dpwave.privacy.ghost import ghost_norms
from dpwave.models import pixel_flow
from dpwave.train import distributed, steps

pytestmark = pytest.mark.integration  # the real jitted DP step with the real model

CLIP, OTHERS, BUCKET = 0.5, 15, 24


@functools.cache
def _setup(ghost: bool):
    config = pixel_flow.PixelFlowConfig(image_size=8, channels=1, num_classes=10, width=8, num_blocks=1,
                                        cond_dropout=0.5)
    graphdef, params = nnx.split(pixel_flow.PixelFlow(config, rngs=nnx.Rngs(params=jax.random.key(0))), nnx.Param)
    # SGD with learning rate 1, no noise, expected batch 1: params_after = params - clipped sum.
    optimizer = privacy.dp_optimizer(optax.sgd(1.0), l2_clip=CLIP, noise_multiplier=0.0, expected_batch_size=1.0, key=0)
    clipped_sum = privacy.clipped_grad(lambda p, ex, key: pixel_flow.example_loss(graphdef, p, ex, key),
                                       l2_clip=CLIP, microbatch_size=8, use_ghost_norms=ghost)
    return steps.dp_step(clipped_sum, optimizer, distributed.make_data_mesh()), optimizer, params


def _clipped_sum(ghost: bool, batch: dict, rng: jax.Array) -> np.ndarray:
    step, optimizer, params = _setup(ghost)
    size = len(batch["label"])
    padded = {k: np.concatenate([v, np.repeat(v[:1], BUCKET - size, axis=0)]) for k, v in batch.items()}
    mask = (np.arange(BUCKET) < size).astype(np.float32)
    new, _ = step(steps.TrainState(jax.tree.map(jnp.copy, params), optimizer.init(params)), padded, mask, rng, 0)
    delta = jax.tree.map(lambda a, b: a - b, params, new.params)
    return np.concatenate([np.ravel(x) for x in jax.tree.leaves(delta)])


@pytest.mark.parametrize("ghost", [False, True], ids=["vmap", "ghost"])
def test_adding_one_image_moves_the_clipped_sum_by_at_most_c(ghost):
    rng = np.random.default_rng(0)
    data = {"image": rng.uniform(-1, 1, (OTHERS + 1, 8, 8, 1)).astype(np.float32),
            "label": rng.integers(0, 10, OTHERS + 1).astype(np.int32)}
    extra, others = {k: v[:1] for k, v in data.items()}, {k: v[1:] for k, v in data.items()}
    key = jax.random.key(3)
    without = _clipped_sum(ghost, others, key)
    assert np.linalg.norm(without) > CLIP  # several examples contribute: a sum that could move by more than C
    for where in (0, OTHERS // 2, OTHERS):
        with_extra = {k: np.concatenate([others[k][:where], extra[k], others[k][where:]]) for k in data}
        moved = float(np.linalg.norm(_clipped_sum(ghost, with_extra, key) - without))
        assert moved <= CLIP * (1 + 1e-5), (where, moved)


def test_ghost_norms_handle_every_kernel_and_equal_the_materialized_ones():
    """Every conv and dense kernel and the label table have no per-example gradient on the ghost path, and its
    norms (certified bounds) and clipped sum equal the vmap path's."""
    graphdef, params = _model(num_classes=10, cond_dropout=0.3)
    loss = lambda p, ex, key: pixel_flow.example_loss(graphdef, p, ex, key)
    rng = np.random.default_rng(1)
    batch = {"image": jnp.asarray(rng.uniform(-1, 1, (6, 8, 8, 1)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 10, 6), jnp.int32)}
    keys = jax.random.split(jax.random.key(2), 6)
    fallback = jax.eval_shape(lambda p: ghost_norms(loss, p, batch, keys).fallback_grads, params)
    names = {jax.tree_util.keystr(k) for k, v in jax.tree_util.tree_leaves_with_path(fallback)}
    assert names and not any("kernel" in n or "embed" in n for n in names), names
    ref, ref_aux = jax.jit(privacy.clipped_grad(loss, l2_clip=0.05))(params, batch, jnp.ones(6), keys)
    got, aux = jax.jit(privacy.clipped_grad(loss, l2_clip=0.05, use_ghost_norms=True))(params, batch, jnp.ones(6), keys)
    assert np.all(np.asarray(aux.norms) >= np.asarray(ref_aux.norms) * (1 - 1e-6))
    np.testing.assert_allclose(aux.norms, ref_aux.norms, rtol=1e-4)
    for r, g in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-7)


def _model(**config) -> tuple[nnx.GraphDef, nnx.State]:
    """A tiny pixel model with perturbed weights (its zero-initialized head would predict 0 whatever the input)."""
    graphdef, params = nnx.split(pixel_flow.PixelFlow(
        pixel_flow.PixelFlowConfig(image_size=8, channels=1, width=8, num_blocks=1, **config),
        rngs=nnx.Rngs(params=jax.random.key(0))), nnx.Param)
    return graphdef, jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(5), p.shape), params)


def test_the_loss_draws_from_the_key_only():
    graphdef, params = _model(num_classes=10, cond_dropout=0.5)
    example = {"image": np.random.default_rng(1).uniform(-1, 1, (8, 8, 1)).astype(np.float32), "label": np.int32(3)}

    @functools.partial(jax.jit, static_argnums=1)
    def losses(seeds, rate):
        keys = jax.vmap(jax.random.key)(seeds)
        return jax.vmap(lambda k: pixel_flow.example_loss(graphdef, params, example, k, rate))(keys)

    same = np.asarray(losses(jnp.array([1, 1, 2]), None))
    assert same[0] == same[1] and same[0] != same[2]
    # The drop is a draw of the key: over keys, some losses are the null class's, the others the label's.
    seeds = jnp.arange(12)
    dropped, kept, mixed = (np.asarray(losses(seeds, rate)) for rate in (1.0, 0.0, None))
    assert np.all(np.abs(dropped - kept) > 1e-4 * np.abs(kept))  # the null class changes every loss
    was_dropped, was_kept = np.isclose(mixed, dropped, rtol=1e-6), np.isclose(mixed, kept, rtol=1e-6)
    assert np.all(was_dropped | was_kept) and was_dropped.any() and was_kept.any()


def test_guidance_zero_is_the_conditional_model_and_guidance_moves_the_samples():
    graphdef, params = _model(num_classes=10, cond_dropout=0.1)
    labels, key = jnp.arange(4, dtype=jnp.int32), jax.random.key(7)
    plain = pixel_flow.generate(graphdef, params, labels, key)
    np.testing.assert_array_equal(pixel_flow.generate(graphdef, params, labels, key, 0.0), plain)
    assert not np.array_equal(pixel_flow.generate(graphdef, params, labels, key, 2.0), plain)
    graphdef, params = _model()  # unconditional: nothing to guide
    np.testing.assert_array_equal(pixel_flow.generate(graphdef, params, labels, key, 2.0),
                                  pixel_flow.generate(graphdef, params, labels, key))
