"""The DP finetuning recipe (dpwave/train/dp_recipe.py) through the real DP stage: trainable subsets, LoRA,
learning-rate schedules, EMA, the DP stage's condition dropout, tuning mode and the public-only control."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import runs

from dpwave import privacy
from dpwave.models import transformer
from dpwave.train import ar_examples, distributed, dp_recipe, loop, pipeline, settings
from dpwave.train.stages.dp_finetune import init_state, state_template
from dpwave.train.stages.pretrain import STAGE as PRETRAIN
from dpwave.train.stages.sample import transformer_params
from dpwave.train.steps import TrainState


def leaves(params) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}


def moved(before, after) -> set[str]:
    """Paths of the leaves that differ; a path only in `after` (an adapter) counts if it is not its init."""
    a, b = leaves(before), leaves(after)
    return {k for k in b if k in a and not np.array_equal(a[k], b[k])}


def pretrained(config, workdir: Path):
    return PRETRAIN.restore_params(settings.read(config), str(workdir / "pretrain"))


def init_transformer(config, finetune: bool = False):
    """(graphdef, params) of the AR model as pretrained, or (`finetune`) as the DP stage trains it."""
    run = settings.read(config)
    return ar_examples.init_transformer(run.dp_transformer if finetune else run.transformer, PRETRAIN.key(run))


def run_steps(stage, count: int) -> list[TrainState]:
    """The states after the stage's first `count` jitted DP steps, fed as its loop feeds them (from a copy of its
    initial state, kept as `stage.state`: the step consumes the state it is given)."""
    state, states = jax.tree.map(jnp.copy, stage.state), []
    for i in range(count):
        examples, mask = stage.batch(i)
        state, _ = stage.step_fn(state, distributed.shard_batch(examples, stage.mesh),
                                 distributed.shard_batch(mask, stage.mesh), stage.key, i)
        states.append(jax.tree.map(jnp.copy, state))
    return states


# ---- learning-rate schedules ---------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.parametrize("schedule, warmup, expected", [
    ("constant", 0, {0: 1e-3, 5: 1e-3, 9: 1e-3}),
    ("constant", 4, {0: 0.0, 2: 5e-4, 4: 1e-3, 9: 1e-3}),
    ("cosine", 0, {0: 1e-3, 5: 5e-4, 10: 0.0}),
    ("cosine", 2, {0: 0.0, 1: 5e-4, 2: 1e-3, 6: 5e-4, 10: 0.0}),
    ("linear", 2, {0: 0.0, 2: 1e-3, 6: 5e-4, 10: 0.0}),
])
def test_learning_rate_schedule_values(schedule, warmup, expected):
    run = settings.read(runs.tiny_config({"dp.recipe.learning_rate": 1e-3, "dp.recipe.lr_schedule": schedule,
                                             "dp.recipe.warmup_steps": warmup}))
    lr = dp_recipe.learning_rate(run.dp.recipe, run.dp.mechanism.steps)
    for step, value in expected.items():
        assert float(lr(step) if callable(lr) else lr) == pytest.approx(value, abs=1e-9), step


@pytest.mark.integration
def test_warmup_makes_the_first_step_a_no_op(base_workdir, tmp_path):
    config = runs.tiny_config({"dp.recipe.warmup_steps": 3})
    workdir = Path(shutil.copytree(base_workdir, tmp_path / "run"))
    first, second = run_steps(runs.dp_stage(config, workdir), 2)
    assert moved(pretrained(config, workdir), first.params) == set()  # learning rate 0 at step 0
    assert moved(first.params, second.params)


# ---- trainable subsets and LoRA ------------------------------------------------------------------
@pytest.mark.integration
def test_trainable_cond_moves_only_the_class_table(base_workdir, tmp_path):
    config = runs.tiny_config({"dp.recipe.trainable": "cond", "dp.mechanism.steps": 3})
    workdir = Path(shutil.copytree(base_workdir, tmp_path / "run"))
    result = runs.run_dp(config, workdir)
    assert moved(pretrained(config, workdir), result.state.params) == {"['class_embed'].value"}


@pytest.mark.integration
@pytest.mark.parametrize("ghost", [pytest.param(False, marks=pytest.mark.slow), True])  # ghost: the default path
def test_lora_starts_at_the_pretrained_function_and_only_adapters_move(base_workdir, tmp_path, ghost):
    config = runs.tiny_config({"dp.recipe.trainable": "lora", "dp.recipe.lora_rank": 2,
                               "dp.recipe.lora_targets": "q+v+mlp", "perf.use_ghost_norms": ghost})
    workdir = Path(shutil.copytree(base_workdir, tmp_path / "run"))
    stage = runs.dp_stage(config, workdir)
    base = pretrained(config, workdir)
    start = stage.state.params
    adapters = {k for k in leaves(start) if "lora" in k}
    assert len(adapters) == 2 * 4 * config.transformer.depth  # A and B of q, v, fc1, fc2 per block
    assert all(not leaves(start)[k].any() for k in adapters if "lora_b" in k)
    assert moved(base, start) == set()  # every pretrained leaf loaded as is

    graphdef_lora, _ = init_transformer(config, finetune=True)
    graphdef_base, _ = init_transformer(config)
    tokens = jnp.asarray(stage.examples["tokens"][:4])
    labels = jnp.asarray(stage.examples["label"][:4])
    logits = nnx.merge(graphdef_lora, start)(tokens, labels)
    np.testing.assert_array_equal(logits, nnx.merge(graphdef_base, base)(tokens, labels))

    end = run_steps(stage, 3)[-1].params
    assert moved(start, end) == adapters
    assert not np.array_equal(nnx.merge(graphdef_lora, end)(tokens, labels), logits)
    # The pretrain stage never builds adapters: LoRA settings leave its fingerprint alone.
    fps, plain = (pipeline.stage_fingerprints(settings.read(c)) for c in (config, runs.tiny_config()))
    assert fps["pretrain"] == plain["pretrain"] and fps["dp_finetune"] != plain["dp_finetune"]


@pytest.mark.integration
def test_load_pretrained_refuses_unknown_and_missing_leaves():
    config = runs.tiny_config({"dp.recipe.lora_rank": 2, "dp.recipe.trainable": "lora"})
    _, lora = init_transformer(config, finetune=True)
    _, base = init_transformer(config)
    other = runs.tiny_config({"transformer.mlp_dim": 48})
    with pytest.raises(ValueError, match="shape"):
        dp_recipe.load_pretrained(lora, init_transformer(other)[1])
    with pytest.raises(ValueError, match="neither pretrained nor a LoRA adapter"):
        dp_recipe.load_pretrained(base, {})


# ---- EMA -----------------------------------------------------------------------------------------
@pytest.mark.integration
def test_ema_follows_the_formula_and_is_what_the_sample_stage_loads(base_workdir, tmp_path):
    decay = 0.5
    config = runs.tiny_config({"dp.recipe.ema_decay": decay, "dp.mechanism.steps": 3})
    workdir = Path(shutil.copytree(base_workdir, tmp_path / "run"))
    states = run_steps(runs.dp_stage(config, workdir), 3)
    expected = pretrained(config, workdir)
    for state in states:
        expected = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, expected, state.params)
    for key, value in leaves(expected).items():
        np.testing.assert_allclose(leaves(states[-1].extra)[key], value, rtol=1e-6, atol=1e-7)

    result = runs.run_dp(config, workdir)  # the same steps through the loop, checkpointed
    assert moved(result.state.params, result.state.extra)  # the EMA differs from the last iterate
    dirs = {name: str(workdir / name) for name in ("tokenizer", "pretrain", "dp_finetune")}
    sampled = transformer_params(settings.read(config), dirs)[1]
    assert moved(result.state.extra, sampled) == set()


# ---- tuning mode ---------------------------------------------------------------------------------
TUNING = {"dp.mechanism.tuning": True, "dp.mechanism.tuning_private_size": 2000, "data.private.split": "heldout",
          "data.private.privacy": "public"}


@pytest.mark.integration
def test_tuning_runs_on_public_data_with_the_private_runs_q_and_noise_per_step(base_workdir, tmp_path):
    config = runs.tiny_config(TUNING)
    workdir = Path(shutil.copytree(base_workdir, tmp_path / "run"))
    stage = runs.dp_stage(config, workdir)
    n = len(stage.examples["tokens"])
    assert n == 500  # the heldout digits
    assert stage.sampler.sampling_prob == pytest.approx(16 / 2000)  # the private run's q
    assert stage.mechanism.params.noise_multiplier == pytest.approx(1.0 * n / 2000)
    # sigma / expected batch equals the private run's 1.0 / 16.
    sigma = stage.mechanism.params.noise_multiplier
    assert sigma / stage.sampler.selection.expected_batch_size == pytest.approx(1.0 / 16)
    assert stage.mechanism.params.target_epsilon is None and stage.guard is None  # the stand-in's epsilon is no budget


@pytest.mark.integration
def test_tuning_refuses_private_data_and_real_runs_refuse_public_data():
    with pytest.raises(ValueError, match="tuning run"):
        settings.read(runs.tiny_config({"dp.mechanism.tuning": True}))
    with pytest.raises(ValueError, match="only the DP stage reads private data"):
        settings.read(runs.tiny_config({"data.private.split": "heldout", "data.private.privacy": "public"}))


# ---- the public-only control ---------------------------------------------------------------------
PUBLIC_ONLY = {"dp.mechanism.target_epsilon": 0.0, "refiner.steps": 2, "sample.num_samples": 20,
               "sample.batch_size": 10, "eval.feature_epochs": 1, "eval.downstream_epochs": 1, "eval.num_real": 50}


@pytest.mark.e2e
def test_public_only_opens_the_private_split_only_to_hash_it_and_reports_epsilon_zero(base_workdir, tmp_path,
                                                                                       monkeypatch):
    opened = runs.forbid_private_reads(monkeypatch)
    config = runs.tiny_config(PUBLIC_ONLY)
    assert "dp_finetune" not in runs.stage_names(config)
    workdir = Path(shutil.copytree(base_workdir, tmp_path / "run"))
    assert pipeline.train_and_evaluate(config, str(workdir))
    assert ("private[:400]", True) in opened and {"public", "heldout", "test"} <= {s for s, _ in opened}
    assert not (workdir / "dp_finetune").exists()

    metrics = json.loads((workdir / "metrics.json").read_text())
    assert (metrics["epsilon"], metrics["delta"], metrics["target_epsilon"], metrics["mode"]) == (
        0.0, 0.0, 0.0, "public_only")
    assert metrics["privacy_ledger"] is None and metrics["dp_steps"] == 0
    assert metrics["memorization_ratio"] is None and "no model was trained on private data" in (
        metrics["reasons"]["memorization_ratio"])
    statement = (workdir / "privacy_statement.txt").read_text()
    assert statement.startswith("(0, 0)-differential privacy") and "no model was trained on private data" in statement
    report = (workdir / "report.md").read_text()
    assert "epsilon 0 (public-only control)" in report and "reads the private images" not in report
    # The samples come from the pretrained weights.
    dirs = {name: str(workdir / name) for name in ("tokenizer", "pretrain")}
    assert moved(pretrained(config, workdir), transformer_params(settings.read(config), dirs)[1]) == set()
    assert loop.read_summary(str(workdir / "sample"))["num_samples"] == 20


@pytest.mark.integration
@pytest.mark.parametrize("overrides", [
    {}, {"dp.recipe.ema_decay": 0.99, "dp.recipe.trainable": "cond", "dp.recipe.optimizer": "adam"}])
def test_the_restore_template_has_the_structure_of_the_dp_stages_state(overrides):
    """What the sample stage restores the DP weights against (no DP optimizer built) matches the state the DP stage
    checkpoints, leaf for leaf (shape and dtype), for every recipe shape."""
    config = runs.tiny_config(overrides)
    run = settings.read(config)
    _, params = init_transformer(config, finetune=True)
    trainable = transformer.trainable_mask(params, run.dp.recipe.trainable)
    mechanism = run.dp.mechanism.build(400)
    optimizer = mechanism.optimizer(dp_recipe.inner_optimizer(run.dp.recipe, run.dp.mechanism.steps),
                                    *privacy.DpSecret(7, 256).noise_keys())
    real = init_state(params, trainable, optimizer, bool(run.dp.recipe.ema_decay))
    template = state_template(run, params, trainable)
    shape = lambda tree: jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)
    assert jax.tree.structure(template) == jax.tree.structure(real)
    assert shape(template) == shape(real)
