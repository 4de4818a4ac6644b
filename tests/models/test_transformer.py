"""Tests of the autoregressive transformer: causality, KV cache, guidance, DP-facing API."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dpwave.models import transformer as tr
from dpwave.models.text import TEXT_PAD, decode_caption, encode_captions
from dpwave.models.transformer import decoding, losses
from dpwave.models.transformer import model as model_lib
from dpwave.privacy.clipping import clipped_grad
from dpwave.privacy.ghost import ghost_norms
from dpwave.privacy.keys import example_keys

pytestmark = pytest.mark.unit

V, T, L, B = 11, 8, 6, 4
TINY = dict(vocab_size=V, seq_len=T, width=16, depth=2, num_heads=2, mlp_dim=32, text_depth=1)
CONFIGS = {
    "class": tr.TransformerConfig(**TINY, num_classes=3, cond_dropout=0.3),
    "text": tr.TransformerConfig(**TINY, max_text_len=L, cond_dropout=0.3),
    "scales": tr.TransformerConfig(**TINY, scale_boundaries=(2, 4, T), norm="rmsnorm", tie_embeddings=True),
}
CAPTIONS = ["a cat", "", "two dogs!", "a cat on a mat"]


def build(cfg: tr.TransformerConfig, seed: int = 0):
    model = tr.ARTransformer(cfg, rngs=nnx.Rngs(seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    assert not jax.tree.leaves(rest)
    return graphdef, params


@functools.cache
def built(name: str):
    return build(CONFIGS[name])


def cond_for(cfg: tr.TransformerConfig, batch: int = B):
    if cfg.conditioning == "class":
        return jnp.arange(batch) % cfg.num_classes
    if cfg.conditioning == "text":
        return jnp.asarray(encode_captions((CAPTIONS * batch)[:batch], cfg.max_text_len))
    return None


@functools.partial(jax.jit, static_argnums=0)
def forward(graphdef, params, tokens, cond, drop):
    return nnx.merge(graphdef, params).forward(tokens, cond, drop)


def logits_of(name, tokens, drop=False):
    graphdef, params = built(name)
    cfg = CONFIGS[name]
    return forward(graphdef, params, tokens, cond_for(cfg, tokens.shape[0]), jnp.full((tokens.shape[0],), drop))


def random_tokens(seed, batch=B, length=T):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, V)


def map_leaves(params, name, fn):
    """Applies fn to the leaves whose parameter name is ``name``."""
    return jax.tree_util.tree_map_with_path(lambda path, x: fn(x) if losses._path_names(path)[-2] == name else x,
                                            params)


def copy_shared(target, source):
    """``target`` (a State) with every leaf taken from ``source`` at the same path."""
    values = source.to_pure_dict()

    def take(path, _):
        node = values
        for key in path:
            node = node[key.key]
        return node

    nnx.replace_by_pure_dict(target, jax.tree_util.tree_map_with_path(take, target.to_pure_dict()))
    return target


# ---- structure ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_causality(name):
    tokens = random_tokens(1)
    base = logits_of(name, tokens)
    for t in range(T - 1):
        changed = tokens.at[:, t + 1 :].set((tokens[:, t + 1 :] + 1 + t) % V)
        other = logits_of(name, changed)
        # logits[:, s] only see tokens[:, :s]: positions <= t + 1 are unchanged, later ones change.
        np.testing.assert_array_equal(other[:, : t + 2], base[:, : t + 2])
        assert t + 2 >= T or np.abs(other[:, t + 2 :] - base[:, t + 2 :]).max() > 1e-4


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", [dict(num_classes=2), dict(max_text_len=L)])
def test_shapes_and_dtypes(dtype, kind):
    cfg = tr.TransformerConfig(**TINY, dtype=dtype, **kind)
    graphdef, params = build(cfg)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    tokens = random_tokens(2, batch=3, length=T - 2)  # shorter than seq_len is allowed
    logits = forward(graphdef, params, tokens, cond_for(cfg, 3), jnp.zeros((3,), bool))
    assert logits.shape == (3, T - 2, V) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()


def test_scale_ids_and_scale_embedding_used():
    np.testing.assert_array_equal(model_lib._scale_ids((2, 4, 8)), [0, 0, 1, 1, 2, 2, 2, 2])
    graphdef, params = built("scales")
    tokens = random_tokens(3)
    params2 = map_leaves(params, "scale_embed", lambda x: x.at[2].add(1.0))
    a = forward(graphdef, params, tokens, None, jnp.zeros((B,), bool))
    b = forward(graphdef, params2, tokens, None, jnp.zeros((B,), bool))
    np.testing.assert_array_equal(a[:, :4], b[:, :4])  # scale 2 starts at token 4
    assert np.abs(a[:, 4:] - b[:, 4:]).min() > 0


# ---- attention ---------------------------------------------------------------------------------
def einsum_attention(q, k, v, mask=None, *, is_causal=False, implementation=None):
    """The attention before jax.nn.dot_product_attention: einsum scores, masked to float32 min, float32 softmax."""
    del implementation
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    visible = jnp.ones(scores.shape, bool) if mask is None else jnp.broadcast_to(mask, scores.shape)
    if is_causal:
        visible &= jnp.tril(jnp.ones(scores.shape[-2:], bool))
    scores = jnp.where(visible, scores * q.shape[-1] ** -0.5, np.finfo(np.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def attention_cases(n: int = 6, prefix: int = 3):
    """(name, mask, causal) of every mask the model builds; row 1's prefix (or keys) are all invalid."""
    valid = jnp.asarray([[1, 1, 0], [0, 0, 0], [1, 0, 1], [1, 1, 1]], bool)[:, :prefix]
    padding = jnp.concatenate([valid, jnp.ones((B, n - prefix), bool)], 1).at[1].set(False)
    return [("causal", None, True), ("caption_prefix", model_lib._prefix_mask(valid, n, n), True),
            ("padding", jnp.broadcast_to(padding[:, None, None, :], (B, 1, n, n)), False)]


@pytest.mark.parametrize("case", range(3), ids=lambda i: attention_cases()[i][0])
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-6), ("bfloat16", 2e-2)])
def test_attention_equals_the_einsum_reference(case, dtype, tol, monkeypatch):
    attention = tr.Attention(tr.TransformerConfig(**TINY, dtype=dtype), rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(2), (B, 6, TINY["width"]))
    _, mask, causal = attention_cases()[case]
    got, _ = attention(x, mask, causal=causal)
    monkeypatch.setattr(jax.nn, "dot_product_attention", einsum_attention)
    want, _ = attention(x, mask, causal=causal)
    assert got.dtype == jnp.dtype(dtype)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tol, rtol=tol)


def test_attention_cache_prefill_and_decode_equal_the_einsum_reference(monkeypatch):
    attention = tr.Attention(tr.TransformerConfig(**TINY), rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(3), (B, 5, TINY["width"]))
    key_valid = jnp.concatenate([jnp.asarray([[1, 0], [0, 0], [1, 1], [0, 1]], bool), jnp.ones((B, 6), bool)], 1)
    empty = (jnp.zeros((B, 8, 2, 8)), jnp.zeros((B, 8, 2, 8)))

    def run():
        out, cache = attention(x[:, :4], model_lib._prefix_mask(key_valid[:, :2], 4, 8), causal=True, cache=empty)
        step, cache = attention(x[:, 4:], model_lib._cache_mask(key_valid, 4, 1), causal=False, cache=cache,
                                index=jnp.int32(4))
        return out, step, cache

    got = run()
    monkeypatch.setattr(jax.nn, "dot_product_attention", einsum_attention)
    want = run()
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6)
    # The decoded position equals the same position of one causal pass over all 5 inputs.
    full, _ = attention(x, model_lib._prefix_mask(key_valid[:, :2], 5, 5), causal=True)
    np.testing.assert_allclose(got[1][:, 0], full[:, 4], atol=1e-6)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_model_logits_equal_the_einsum_reference(name, monkeypatch):
    graphdef, params = built(name)
    tokens, cond = random_tokens(13), cond_for(CONFIGS[name])
    drop = jnp.asarray([False, True, False, False])
    got = nnx.merge(graphdef, params).forward(tokens, cond, drop)
    monkeypatch.setattr(jax.nn, "dot_product_attention", einsum_attention)
    want = nnx.merge(graphdef, params).forward(tokens, cond, drop)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_attention_impl_is_validated_and_left_out_of_fingerprints():
    from dpwave.train.fingerprints import jsonable

    with pytest.raises(ValueError, match="attention_impl must be"):
        tr.TransformerConfig(**TINY, attention_impl="flash")
    with pytest.raises(ValueError, match="needs dtype"):
        tr.TransformerConfig(**TINY, attention_impl="cudnn")  # float32
    with pytest.raises(ValueError, match="multiple of 8"):
        tr.TransformerConfig(**{**TINY, "width": 12}, dtype="bfloat16", attention_impl="cudnn")
    xla, cudnn = (tr.TransformerConfig(**TINY, dtype="bfloat16", attention_impl=i) for i in ("xla", "cudnn"))
    assert xla != cudnn and hash(xla) != hash(cudnn)  # a static jit argument: each compiles its own kernel
    assert jsonable(xla) == jsonable(cudnn) == jsonable(tr.TransformerConfig(**TINY, dtype="bfloat16"))
    assert "attention_impl" not in jsonable(xla)
    q = jnp.zeros((1, 4, 2, 8), jnp.bfloat16)
    auto = "cudnn" if model_lib._cuda_flash_capable() else "xla"  # xla on CPU
    assert model_lib._attention_impl(None, q, 4, masked=False) == auto
    assert model_lib._attention_impl(None, q, 3, masked=True) == "xla"  # the bias gradient needs even lengths
    assert model_lib._attention_impl(None, q.astype(jnp.float32), 4, masked=False) == "xla"
    assert model_lib._attention_impl("cudnn", q, 3, masked=True) == "cudnn"


# ---- conditioning ------------------------------------------------------------------------------
def test_label_and_caption_conditioning_change_logits():
    tokens = jnp.tile(random_tokens(4, batch=1), (B, 1))
    for name in ("class", "text"):
        logits = logits_of(name, tokens)
        null = logits_of(name, tokens, drop=True)
        assert np.abs(logits[0] - logits[1]).max() > 1e-4, name  # different labels / captions
        assert np.abs(logits[0] - null[0]).max() > 1e-4, name
        np.testing.assert_allclose(null[0], null[1], atol=1e-6)  # null ignores the condition
    # A caption and a shorter caption differ; equal captions in different rows agree.
    graphdef, params = built("text")
    text = jnp.asarray(encode_captions(["a cat", "a ca", "a cat", "a cat"], L))
    logits = forward(graphdef, params, tokens, text, jnp.zeros((B,), bool))
    assert np.abs(logits[0] - logits[1]).max() > 1e-4
    np.testing.assert_allclose(logits[0], logits[2], atol=1e-6)


@pytest.mark.parametrize("name", ["class", "text"])
def test_condition_dropout_rate_uses_explicit_key(name):
    cfg, n = CONFIGS[name], 1000
    graphdef, params = built(name)
    tokens = jnp.tile(random_tokens(5, batch=1), (n, 1))
    cond = cond_for(cfg, n)
    kept = forward(graphdef, params, tokens, cond, jnp.zeros((n,), bool))
    null = forward(graphdef, params, tokens, cond, jnp.ones((n,), bool))
    train = jax.jit(lambda p, key: nnx.merge(graphdef, p)(tokens, cond, train=True, key=key))
    out = train(params, jax.random.key(7))
    is_null = np.abs(out - null).max((1, 2)) < 1e-5
    is_kept = np.abs(out - kept).max((1, 2)) < 1e-5
    assert (is_null ^ is_kept).all()
    # Binomial(1000, 0.3): 5 standard errors (0.072) -> false alarm < 1e-6.
    assert abs(is_null.mean() - cfg.cond_dropout) < 5 * np.sqrt(0.3 * 0.7 / n)
    np.testing.assert_array_equal(train(params, jax.random.key(7)), out)  # deterministic in the key
    with pytest.raises(ValueError, match="key"):
        nnx.merge(graphdef, params)(tokens[:2], cond[:2], train=True)


def test_dropout_needs_and_follows_the_explicit_key():
    cfg = tr.TransformerConfig(**TINY, max_text_len=L, dropout=0.5)
    graphdef, params = build(cfg)
    tokens, text = random_tokens(10), cond_for(cfg)

    @jax.jit
    def run(params):
        model = nnx.merge(graphdef, params)
        train = lambda seed: model(tokens, text, train=True, key=jax.random.key(seed))
        return (
            model(tokens, text, key=jax.random.key(0)),
            model(tokens, text, key=jax.random.key(1)),
            train(0),
            train(1),
            train(0),
        )

    eval_a, eval_b, train_a, train_b, train_a2 = run(params)
    np.testing.assert_array_equal(eval_a, eval_b)  # no dropout outside training
    assert np.abs(train_a - eval_a).max() > 1e-3 and np.abs(train_a - train_b).max() > 1e-3
    np.testing.assert_array_equal(train_a, train_a2)


# ---- KV cache, guidance, sampling ---------------------------------------------------------------
@pytest.mark.parametrize("name,scale,prefix_len", [("class", 0.0, 0), ("text", 2.0, 2), ("scales", 0.0, 3)])
def test_kv_cache_matches_full_recomputation(name, scale, prefix_len):
    cfg = CONFIGS[name]
    model = build(cfg)
    cond, key = cond_for(cfg), jax.random.key(11)
    prefix = random_tokens(6)[:, :prefix_len] if prefix_len else None
    kw = dict(guidance_scale=scale, prefix=prefix, batch_size=B, return_logits=True)
    tokens, logits = tr.sample(model, cond, key, **kw)
    assert tokens.shape == (B, T) and tokens.dtype == jnp.int32
    assert logits.shape == (B, T - prefix_len, V)
    if prefix is not None:
        np.testing.assert_array_equal(tokens[:, :prefix_len], prefix)
    if name == "text":  # the uncached reference sampler draws the same tokens from the same key
        ref_tokens, ref_logits = tr.sample(model, cond, key, cached=False, **kw)
        np.testing.assert_array_equal(tokens, ref_tokens)
        np.testing.assert_allclose(logits, ref_logits, atol=1e-5)
    # Along the sampled sequence, the cached logits equal one full forward pass.
    full = logits_of(name, tokens)[:, prefix_len:]
    if scale:
        full = tr.guide(full, logits_of(name, tokens, drop=True)[:, prefix_len:], scale)
    np.testing.assert_allclose(logits, full, atol=1e-5)


def test_guidance_scale_zero_is_the_conditional_model():
    graphdef, params = built("class")
    cond, key, prefix = cond_for(CONFIGS["class"]), jax.random.key(3), jnp.zeros((B, 0), jnp.int32)
    kw = dict(num_tokens=T, top_k=None, top_p=None, cached=True, return_logits=True)
    # The batched cond+null path (guided=True) at scale 0 ...
    tokens, logits = decoding._sample_jit(graphdef, params, cond, key, prefix, 1.0, 0.0, guided=True, **kw)
    # ... equals sampling the conditional model alone.
    ref_tokens, ref_logits = tr.sample((graphdef, params), cond, key, return_logits=True)
    np.testing.assert_array_equal(tokens, ref_tokens)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5)


def test_filter_logits_support():
    logits = jax.random.normal(jax.random.key(0), (5, V)) * 2
    probs = np.asarray(jax.nn.softmax(logits))
    kept_k = np.isfinite(np.asarray(tr.filter_logits(logits, top_k=3)))
    np.testing.assert_array_equal(kept_k, np.argsort(np.argsort(-probs, 1), 1) < 3)
    for p in (0.05, 0.5, 0.9, 1.0):
        kept_p = np.isfinite(np.asarray(tr.filter_logits(logits, top_p=p)))
        for row, keep in zip(probs, kept_p):
            order = np.argsort(-row)
            need = int(np.searchsorted(np.cumsum(row[order]), p - 1e-6)) + 1
            assert set(np.flatnonzero(keep)) == set(order[: min(need, V)])


def test_sampling_respects_top_k_and_top_p():
    model = built("class")
    cond = cond_for(CONFIGS["class"])
    keys = [jax.random.key(i) for i in range(4)]

    def draws(**kw):
        out = [tr.sample(model, cond, k, temperature=3.0, return_logits=True, **kw) for k in keys]
        return np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out])

    tokens, logits = draws(top_k=3, top_p=0.4)
    allowed = np.isfinite(np.asarray(tr.filter_logits(logits / 3.0, 3, 0.4)))
    assert np.take_along_axis(allowed, tokens[..., None], -1).all()
    assert allowed.sum(-1).max() <= 3 and allowed.sum(-1).min() >= 1
    assert (allowed.sum(-1) < 3).any()  # the nucleus cut some top-3 sets further
    free, _ = draws()
    assert len(np.unique(free)) > 4  # unrestricted sampling does use more tokens


# ---- DP-facing functional API -----------------------------------------------------------------
@pytest.mark.parametrize("name", ["class", "text"])
def test_per_example_loss_vmap_grad_and_batched_mean(name):
    cfg = CONFIGS[name]
    graphdef, params = built(name)
    batch = {"tokens": random_tokens(8)}
    batch["label" if name == "class" else "caption_bytes"] = cond_for(cfg)
    rngs = jax.random.split(jax.random.key(0), B)

    n = 64  # copies of example 0, for the training-mode check below
    copies = jax.tree.map(lambda x: jnp.repeat(x[:1], n, axis=0), batch)

    @jax.jit
    def run(params):
        loss = functools.partial(tr.per_example_loss, graphdef, train=False)
        vmapped = lambda f, *args: jax.vmap(f, (None, 0, 0))(params, *args)
        return (
            vmapped(jax.value_and_grad(loss), batch, rngs),
            tr.batch_loss(graphdef, params, batch, None, train=False),
            vmapped(functools.partial(tr.per_example_loss, graphdef), copies, jax.random.split(jax.random.key(1), n)),
        )

    (losses, per_grads), mean, train_losses = run(params)
    for g, param in zip(jax.tree.leaves(per_grads), jax.tree.leaves(params)):
        assert g.shape == (B,) + param.shape and g.dtype == jnp.float32
    assert np.abs(per_grads["token_embed"][...][0] - per_grads["token_embed"][...][1]).max() > 0
    np.testing.assert_allclose(losses.mean(), mean, rtol=1e-6)
    # Training mode: each example's condition dropout comes from its own rng (rate 0.3), so
    # copies of one example get either its conditional or its null-condition loss.
    null = tr.token_nll(logits_of(name, copies["tokens"][:B], drop=True), copies["tokens"][:B])[0]
    is_null = np.isclose(train_losses, null, atol=1e-5)
    assert (is_null | np.isclose(train_losses, losses[0], atol=1e-5)).all()
    assert 0 < is_null.sum() < n
    with pytest.raises(ValueError, match="label|caption_bytes"):
        tr.per_example_loss(graphdef, params, {"tokens": batch["tokens"][0]}, rngs[0])


@pytest.mark.parametrize("targets,adapted_per_layer", [("qv", 2), ("all", 6), ("q+k+v+o", 4), ("mlp", 2), ("v", 1)])
def test_lora_is_identity_at_init_and_mask_selects_adapters(targets, adapted_per_layer):
    cfg = tr.TransformerConfig(**TINY, num_classes=3, lora_rank=2, lora_targets=targets)
    graphdef, params = build(cfg, seed=1)
    mask = tr.trainable_mask(params, "lora")
    selected = [losses._path_names(p)[-2] for p, m in jax.tree_util.tree_leaves_with_path(mask) if m]
    assert sorted(set(selected)) == ["lora_a", "lora_b"]
    assert len(selected) == 2 * adapted_per_layer * cfg.depth
    # The base model with the LoRA model's base weights gives identical logits while B == 0.
    base_graphdef, base_params = build(tr.TransformerConfig(**TINY, num_classes=3))
    base_params = copy_shared(base_params, params)
    tokens, labels, drop = random_tokens(9), cond_for(cfg), jnp.zeros((B,), bool)
    lora_logits = forward(graphdef, params, tokens, labels, drop)
    np.testing.assert_array_equal(lora_logits, forward(base_graphdef, base_params, tokens, labels, drop))
    bumped = map_leaves(params, "lora_b", lambda x: x + 0.1)
    assert np.abs(forward(graphdef, bumped, tokens, labels, drop) - lora_logits).max() > 1e-4


def test_trainable_mask_modes():
    _, params = built("text")
    assert all(jax.tree.leaves(tr.trainable_mask(params, "all")))
    attention = tr.trainable_mask(params, "attention")
    paths = [losses._path_names(p) for p, m in jax.tree_util.tree_leaves_with_path(attention) if m]
    cfg = CONFIGS["text"]
    assert len(paths) == 8 * (cfg.depth + cfg.text_depth)  # q/k/v/o kernels and biases
    assert all("attn" in p for p in paths)
    assert jax.tree.structure(attention) == jax.tree.structure(params)
    with pytest.raises(ValueError, match="lora_rank"):
        tr.trainable_mask(params, "lora")
    with pytest.raises(ValueError, match="mode 'mlps'"):
        tr.trainable_mask(params, "mlps")
    with pytest.raises(ValueError, match="mode 'cond\\+'"):
        tr.trainable_mask(params, "cond+")


def selected_names(mask) -> set[tuple[str, ...]]:
    """The parameter paths (without the trailing 'value') a mask selects."""
    return {tuple(losses._path_names(p)[:-1]) for p, m in jax.tree_util.tree_leaves_with_path(mask) if m}


def test_trainable_groups_compose_and_select_what_they_name():
    cfg = tr.TransformerConfig(**TINY, num_classes=3, lora_rank=2, lora_targets="q+v")
    _, params = build(cfg)
    assert selected_names(tr.trainable_mask(params, "cond")) == {("class_embed",)}
    assert selected_names(tr.trainable_mask(params, "head")) == {("head", "kernel"), ("head", "bias")}
    assert selected_names(tr.trainable_mask(params, "embed")) == {("token_embed",), ("pos_embed",), ("bos",)}
    lora = selected_names(tr.trainable_mask(params, "lora"))
    assert {n[-1] for n in lora} == {"lora_a", "lora_b"} and len(lora) == 2 * 2 * cfg.depth
    assert selected_names(tr.trainable_mask(params, "cond+lora")) == lora | {("class_embed",)}
    mlp = selected_names(tr.trainable_mask(params, "mlp"))
    assert mlp and all("mlp" in n and n[-1] in ("kernel", "bias") for n in mlp)
    norm = selected_names(tr.trainable_mask(params, "norm"))
    assert len(norm) == 2 * (2 * cfg.depth + 1)  # scale and bias of attn_norm, mlp_norm per block, final_norm
    # Groups never pick an adapter except lora and all; all picks everything.
    every = selected_names(tr.trainable_mask(params, "all"))
    assert selected_names(tr.trainable_mask(params, "attention+mlp+norm+embed+cond+head")) == every - lora
    _, text_params = built("text")
    cond = selected_names(tr.trainable_mask(text_params, "cond"))
    assert ("null_embed",) in cond and all(n[0] in ("null_embed", "text_encoder") for n in cond)
    with pytest.raises(ValueError, match="group 'cond'"):
        tr.trainable_mask(built("scales")[1], "cond")  # an unconditional model has no condition encoder


@pytest.mark.parametrize("spec", ["", "qk", "q+x", "mlp+"])
def test_bad_lora_targets_are_refused(spec):
    with pytest.raises(ValueError, match="lora_targets"):
        tr.TransformerConfig(**TINY, lora_rank=2, lora_targets=spec)


# ---- learning ----------------------------------------------------------------------------------
def test_tiny_model_overfits_label_conditioned_sequences():
    """Each label has its own fixed sequence: the loss can only vanish if conditioning works."""
    cfg = tr.TransformerConfig(**{**TINY, "width": 32}, num_classes=4)
    graphdef, params = build(cfg)
    batch = {"tokens": random_tokens(12, batch=4), "label": jnp.arange(4)}
    opt = optax.adam(3e-3)

    @jax.jit
    def train(params, opt_state):
        def step(carry, _):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(tr.batch_loss, 1)(graphdef, params, batch, None)
            updates, opt_state = opt.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        return jax.lax.scan(step, (params, opt_state), None, length=300)

    (params, _), losses = train(params, opt.init(params))
    assert losses[0] > 0.9 * np.log(V)
    assert losses[-1] < 0.05, losses[-1]
    # Greedy samples reproduce each label's sequence.
    tokens = tr.sample((graphdef, params), batch["label"], jax.random.key(0), top_k=1)
    np.testing.assert_array_equal(tokens, batch["tokens"])


# ---- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override,field",
    [
        (dict(vocab_size=1), "vocab_size"),
        (dict(seq_len=0), "seq_len"),
        (dict(width=15), "width"),
        (dict(depth=0), "depth"),
        (dict(num_heads=3), "num_heads"),
        (dict(num_classes=0), "num_classes"),
        (dict(num_classes=3, max_text_len=4), "not both"),
        (dict(dropout=1.0), "dropout"),
        (dict(num_classes=3, cond_dropout=-0.1), "cond_dropout"),
        (dict(cond_dropout=0.1), "cond_dropout"),
        (dict(dtype="int8"), "dtype"),
        (dict(norm="batchnorm"), "norm"),
        (dict(lora_rank=-1), "lora_rank"),
        (dict(lora_targets="ffn"), "lora_targets"),
        (dict(lora_alpha=0.0), "lora_alpha"),
        (dict(scale_boundaries=(4, 4, T)), "scale_boundaries"),
        (dict(scale_boundaries=(4, 6)), "seq_len"),
        (dict(mlp_dim=2.5), "mlp_dim"),
        (dict(depth=True), "depth"),
    ],
)
def test_bad_config_values(override, field):
    with pytest.raises(ValueError, match=field):
        tr.TransformerConfig(**{**TINY, **override})


def test_config_from_dict():
    cfg = tr.TransformerConfig.from_dict({**TINY, "scale_boundaries": [2, 4, T], "dtype": jnp.bfloat16})
    assert cfg.scale_boundaries == (2, 4, T) and cfg.dtype == "bfloat16"
    hash(cfg)
    with pytest.raises(ValueError, match="widht"):
        tr.TransformerConfig.from_dict({**TINY, "widht": 3})


def test_bad_inputs():
    graphdef, params = built("class")
    model = nnx.merge(graphdef, params)
    tokens = random_tokens(0)
    with pytest.raises(ValueError, match="labels"):
        model(tokens, jnp.array([0, 1, 2, 3]))  # label 3 with 3 classes
    with pytest.raises(ValueError, match="labels"):
        model(tokens, jnp.zeros((B, 1), jnp.int32))
    with pytest.raises(ValueError, match="cond"):
        model(tokens, None)
    with pytest.raises(ValueError, match="length"):
        model(random_tokens(0, length=T + 1), cond_for(CONFIGS["class"]))
    with pytest.raises(ValueError, match="tokens"):
        model(tokens.astype(jnp.float32), cond_for(CONFIGS["class"]))
    text_model = nnx.merge(*built("text"))
    with pytest.raises(ValueError, match="encode_captions"):
        text_model(tokens, jnp.zeros((B, L + 1), jnp.int32))
    scales_model = nnx.merge(*built("scales"))
    with pytest.raises(ValueError, match="unconditional"):
        scales_model(tokens, jnp.zeros((B,), jnp.int32))
    labels = cond_for(CONFIGS["class"])
    key = jax.random.key(0)
    for kw, match in [
        (dict(temperature=0.0), "temperature"),
        (dict(top_k=V + 1), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(num_tokens=T + 1), "num_tokens"),
        (dict(prefix=tokens), "prefix"),
    ]:
        with pytest.raises(ValueError, match=match):
            tr.sample(model, labels, key, **kw)
    with pytest.raises(ValueError, match="batch_size"):
        tr.sample(scales_model, None, key)
    with pytest.raises(ValueError, match="guidance"):
        tr.sample(scales_model, None, key, batch_size=2, guidance_scale=1.0)


def test_caption_bytes_round_trip():
    text = encode_captions(["héllo", "", "x" * 10], 6)
    assert text.shape == (3, 6) and text.dtype == np.int32
    assert decode_caption(text[0]) == "héllo" and decode_caption(text[1]) == ""
    assert decode_caption(text[2]) == "x" * 6 and (text[1] == TEXT_PAD).all()
    with pytest.raises(ValueError, match="single string"):
        encode_captions("abc", 4)
    with pytest.raises(ValueError, match="max_len"):
        encode_captions(["abc"], 0)


def test_all_scales_model_samples_each_position_from_its_own_scale():
    """The full-DP baseline's tokenizer offsets scale s by s*K: sampling never crosses scales."""
    cfg = tr.TransformerConfig(
        vocab_size=3 * 8, seq_len=6, width=16, depth=1, num_heads=2, mlp_dim=16, scale_boundaries=(2, 4, 6)
    )
    model = tr.ARTransformer(cfg, rngs=nnx.Rngs(0))
    tokens = tr.sample(model, None, jax.random.key(1), batch_size=64, temperature=5.0)
    scale_of_position = np.array([0, 0, 1, 1, 2, 2])
    np.testing.assert_array_equal(np.asarray(tokens) // 8, np.broadcast_to(scale_of_position, tokens.shape))


# ---- scanned blocks -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["class", "text"])
def test_scanned_blocks_stack_the_unrolled_weights_and_compute_the_same_function(name):
    cfg = dataclasses.replace(CONFIGS[name], depth=3, dropout=0.2)
    graphdef, params = build(cfg)
    scan_graphdef, scanned = build(dataclasses.replace(cfg, scan_blocks=True))
    unrolled = params.to_pure_dict()
    stacked = jax.tree.map(lambda *layers: np.stack(layers), *(unrolled["blocks"][i] for i in range(3)))
    jax.tree.map(np.testing.assert_array_equal, scanned.to_pure_dict(), {**unrolled, "blocks": stacked})
    tokens, cond, key = random_tokens(3), cond_for(cfg), jax.random.key(5)
    train = lambda g, p: nnx.merge(g, p)(tokens, cond, train=True, key=key)  # dropout: the same key per block
    np.testing.assert_allclose(train(scan_graphdef, scanned), train(graphdef, params), atol=1e-5)
    kw = dict(guidance_scale=2.0, batch_size=B, return_logits=True)
    got, got_logits = tr.sample((scan_graphdef, scanned), cond, key, **kw)  # the stacked KV cache
    want, want_logits = tr.sample((graphdef, params), cond, key, **kw)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got_logits, want_logits, atol=1e-5)
    assert losses.trainable_mask(scanned, "attention")["blocks"]["attn"]["q_proj"]["kernel"].value


def test_scanned_block_kernels_are_ghost_handled_and_give_the_materialized_update():
    cfg = dataclasses.replace(CONFIGS["class"], depth=3, scan_blocks=True)
    graphdef, params = build(cfg)
    batch = {"tokens": random_tokens(4), "label": jnp.arange(B) % 3}
    loss = lambda p, example, key: losses.per_example_loss(graphdef, p, example, key)
    keys = example_keys(jax.random.key(0), batch)
    fallback = ghost_norms(loss, params, batch, keys).fallback_grads
    handled = {jax.tree_util.keystr(path) for path, g in jax.tree_util.tree_leaves_with_path(
        fallback, is_leaf=lambda x: x is None) if g is None}
    assert {f"['blocks']['{m}']['{d}']['kernel'].value" for m, d in (("attn", "q_proj"), ("attn", "o_proj"),
                                                                     ("mlp", "fc1"), ("mlp", "fc2"))} <= handled
    ref, ref_aux = jax.jit(clipped_grad(loss, l2_clip=0.05))(params, batch, jnp.ones(B), keys)
    got, aux = jax.jit(clipped_grad(loss, l2_clip=0.05, use_ghost_norms=True))(params, batch, jnp.ones(B), keys)
    assert np.all(aux.norms >= ref_aux.norms) and np.all(ref_aux.norms > 0.05)  # every example clipped
    np.testing.assert_allclose(aux.norms, ref_aux.norms, rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), got, ref)
