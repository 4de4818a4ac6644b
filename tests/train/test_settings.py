"""dpwave.train.settings: the config read once into validated dataclasses, each section into the type of its name
(config.dp's four sections into `Dp`'s four fields), every refusal naming the config key at fault."""

from __future__ import annotations

import dataclasses

import pytest
from helpers import runs

from dpwave.train import settings

pytestmark = pytest.mark.unit


def test_config_dp_sections_are_the_fields_of_dp_and_their_keys_the_fields_of_their_types():
    config = runs.tiny_config()
    assert sorted(config.dp) == sorted(f.name for f in dataclasses.fields(settings.Dp)) == sorted(settings.DP_SECTIONS)
    for name, cls in settings.DP_SECTIONS.items():
        assert sorted(config.dp[name]) == sorted(f.name for f in dataclasses.fields(cls)), name
    dp = settings.read(config).dp
    assert (dp.mechanism.steps, dp.mechanism.noise_multiplier, dp.secret.seed) == (10, 1.0, 7)
    assert (dp.recipe.optimizer, dp.operations.compose_on_resume) == (config.dp.recipe.optimizer, False)


@pytest.mark.parametrize("path", ["dp.recipe.epsilon", "dp.mechanism.learning_rate", "sample.temperatur"])
def test_a_key_its_section_does_not_read_is_refused_not_dropped(path):
    with pytest.raises(ValueError, match=rf"config\.{path.rsplit('.', 1)[0]} has {path.rsplit('.', 1)[1]}, which "):
        settings.read(runs.tiny_config({path: 1.0}))


@pytest.mark.parametrize("overrides, message", [
    ({"dp.mechanism.target_epsilon": -1.0}, "config.dp.mechanism.target_epsilon=-1.0: use > 0, inf"),
    ({"dp.mechanism.target_epsilon": 0.0, "dp.mechanism.tuning": True}, "config.dp.mechanism.tuning needs a DP"),
    ({"dp.mechanism.tuning_private_size": 100}, "tuning_private_size=100 applies only with tuning=True"),
    ({"dp.recipe.optimizer": "lamb"}, "config.dp.recipe.optimizer='lamb'; use one of"),
    ({"dp.recipe.weight_decay": 0.1}, "config.dp.recipe.weight_decay=0.1 applies only to optimizer='adamw'"),
    ({"dp.recipe.lr_schedule": "step"}, "config.dp.recipe.lr_schedule='step'; use one of"),
    ({"dp.recipe.warmup_steps": 11}, r"warmup_steps=11 must be in \[0, dp.mechanism.steps=10\]"),
    ({"dp.recipe.ema_decay": 1.0}, r"config.dp.recipe.ema_decay=1.0 must be in \[0, 1\)"),
    ({"dp.recipe.lora_rank": 2, "dp.recipe.trainable": "cond"}, "add 'lora' to trainable"),
    ({"dp.recipe.trainable": "cond+mlps"}, "mlps"),
])
def test_bad_dp_settings_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        settings.read(runs.tiny_config(overrides))


def test_the_dp_stage_model_takes_the_recipes_lora_and_condition_dropout():
    s = settings.read(runs.tiny_config({"dp.recipe.lora_rank": 2, "dp.recipe.trainable": "cond+lora",
                                        "dp.recipe.cond_dropout": 0.3}))
    assert (s.dp_transformer.lora_rank, s.dp_transformer.cond_dropout) == (2, 0.3)
    assert (s.transformer.lora_rank, s.transformer.cond_dropout) == (0, 0.1)  # pretraining's
    assert settings.read(runs.tiny_config({"dp.recipe.cond_dropout": None})).dp_transformer.cond_dropout == 0.1
    assert settings.read(runs.tiny_config({"dp.recipe.cond_dropout": 0.0})).dp_transformer.cond_dropout == 0.0


@pytest.mark.parametrize("overrides, message", [
    ({"sample.top_k": -1}, r"config.sample: top_k=-1 must be an int in \[1, vocab_size=64\]"),
    ({"sample.top_k": 65}, "top_k=65 must be an int in"),
    ({"sample.top_p": 1.5}, r"config.sample: top_p=1.5 must be in \(0, 1\)"),
    ({"sample.temperature": 0.0}, "config.sample: temperature=0.0 must be a number > 0"),
])
def test_bad_sampling_settings_are_refused_before_any_stage_not_after_training(overrides, message):
    with pytest.raises(ValueError, match=message):
        settings.read(runs.tiny_config(overrides))
    settings.read(runs.tiny_config({"sample.top_k": 0, "sample.top_p": 1.0}))  # 0 and 1.0: no filtering


def test_merf_methods_refuse_captions_and_bad_settings():
    with pytest.raises(ValueError, match="caption conditioning"):
        settings.read(runs.baseline_config("dp_merf", **{"data.condition": "caption", "data.num_classes": None}))
    with pytest.raises(ValueError, match=r"config.merf.num_features=201 must be even"):
        settings.read(runs.baseline_config("dp_merf", **{"merf.num_features": 201}))
    with pytest.raises(ValueError, match=r"config.merf.count_weight=1.0 must be in \(0, 1\)"):
        settings.read(runs.baseline_config("dp_merf", **{"merf.count_weight": 1.0}))


def test_dp_diffusion_refuses_transformer_parameter_groups():
    with pytest.raises(ValueError, match="dp.recipe.trainable='all' and dp.recipe.lora_rank=0"):
        settings.read(runs.baseline_config("dp_diffusion", **{"dp.recipe.trainable": "cond"}))
