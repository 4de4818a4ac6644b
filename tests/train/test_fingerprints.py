"""Stage fingerprints (`inputs_sha256`): what each stage depends on, and the refusal of stale stages."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import pytest

from dpwave.train import loop, pipeline
from experiments.configs import mnist

ALL = ("tokenizer", "pretrain", "dp_finetune", "refiner", "sample", "evaluate")


def config(arg: str = "tiny", **overrides: Any):
    """`mnist.py:<arg>` with dotted-path overrides ({"dp.delta": 1e-6})."""
    c = mnist.get_config(arg)
    with c.unlocked():
        for path, value in overrides.items():
            *parents, leaf = path.split(".")
            node = c
            for name in parents:
                node = node[name]
            node[leaf] = value
    return c


def changed(a, b) -> set[str]:
    fa, fb = pipeline.stage_fingerprints(a), pipeline.stage_fingerprints(b)
    assert fa.keys() == fb.keys()
    return {name for name in fa if fa[name] != fb[name]}


def test_fingerprints_cover_every_stage_and_are_deterministic():
    fps = pipeline.stage_fingerprints(config())
    assert list(fps) == list(ALL) == pipeline.stage_names(config())
    assert all(len(v) == 64 and int(v, 16) >= 0 for v in fps.values())
    assert len(set(fps.values())) == len(fps)  # the stage name is part of the inputs
    assert pipeline.stage_fingerprints(config()) == fps


@pytest.mark.parametrize("path, value, stages", [
    ("dp.target_epsilon", 1.0, {"dp_finetune", "sample", "evaluate"}),
    ("dp.target_epsilon", float("inf"), {"dp_finetune", "sample", "evaluate"}),  # inf is fingerprinted too
    ("data.private.split", "private[:400]", {"dp_finetune", "sample", "evaluate"}),
    ("tokenizer.steps", 31, {"tokenizer", "pretrain", "dp_finetune", "sample", "evaluate"}),
    ("wavelet.name", "db2", {"tokenizer", "pretrain", "dp_finetune", "refiner", "sample", "evaluate"}),
    ("transformer.width", 48, {"pretrain", "dp_finetune", "sample", "evaluate"}),
    ("pretrain.learning_rate", 3e-4, {"pretrain", "dp_finetune", "sample", "evaluate"}),
    ("refiner.steps", 31, {"refiner", "sample", "evaluate"}),
    ("data.condition", "none", {"pretrain", "dp_finetune", "refiner", "sample", "evaluate"}),
    ("seed", 1, set(ALL)),
    ("sample.temperature", 0.5, {"sample", "evaluate"}),
    ("eval.feature_epochs", 3, {"sample", "evaluate"}),  # sample and evaluate depend on everything
    ("checkpoint.every_steps", 5, {"sample", "evaluate"}),  # not a training stage's result: resume is exact
])
def test_a_field_changes_exactly_the_stages_that_depend_on_it(path, value, stages):
    assert changed(config(), config(**{path: value})) == stages


def test_methods_share_the_stages_whose_inputs_they_share():
    dpwave, bicubic, full_dp = (pipeline.stage_fingerprints(config(f"tiny,method={m}"))
                                for m in ("dpwave", "bicubic", "full_dp"))
    assert dpwave["tokenizer"] == bicubic["tokenizer"] == full_dp["tokenizer"]
    assert dpwave["pretrain"] == bicubic["pretrain"] != full_dp["pretrain"]  # coarse band vs all scales
    assert "refiner" in dpwave and "refiner" not in bicubic and "refiner" not in full_dp
    assert dpwave["sample"] != bicubic["sample"]
    # Epsilon rows of one method differ only from the DP stage on.
    eps1 = pipeline.stage_fingerprints(config("tiny,epsilon=1"))
    assert {k for k in dpwave if dpwave[k] != eps1[k]} == {"dp_finetune", "sample", "evaluate"}


def write_stage(workdir: Path, name: str, inputs_sha256: str | None) -> None:
    summary = {"stage": name, "params_sha256": "0" * 64}
    if inputs_sha256 is not None:
        summary["inputs_sha256"] = inputs_sha256
    (workdir / name).mkdir(parents=True)
    (workdir / name / loop.SUMMARY).write_text(json.dumps(summary))


def test_matching_finished_stages_pass_the_check(tmp_path):
    c = config()
    fps = pipeline.stage_fingerprints(c)
    for name in ("tokenizer", "pretrain", "refiner"):
        write_stage(tmp_path, name, fps[name])
    (tmp_path / "dp_finetune").mkdir()  # unfinished: resumes, not checked here
    pipeline.check_finished_stages(config("tiny,epsilon=1"), str(tmp_path), fps)
    pipeline.check_finished_stages(c, str(tmp_path), pipeline.stage_fingerprints(config("tiny,epsilon=1")))


def test_a_stale_finished_stage_is_refused_naming_the_stage_and_the_changed_field(tmp_path):
    old = config()
    pipeline.write_run_info(old, str(tmp_path))
    fps = pipeline.stage_fingerprints(old)
    for name in ("tokenizer", "pretrain", "dp_finetune"):
        write_stage(tmp_path, name, fps[name])
    new = config("tiny,epsilon=1")
    with pytest.raises(pipeline.StaleStageError, match=r"stage 'dp_finetune' .*dp\.target_epsilon: 10\.0 -> 1\.0"
                       r".*new --workdir") as info:
        pipeline.check_finished_stages(new, str(tmp_path), pipeline.stage_fingerprints(new))
    assert isinstance(info.value, ValueError) and "tokenizer" not in str(info.value)
    # A tokenizer change is reported at the tokenizer, the first stale stage; only its fields are named.
    new = config(**{"tokenizer.steps": 31, "sample.temperature": 0.5})
    with pytest.raises(pipeline.StaleStageError, match=r"stage 'tokenizer'.*changed: tokenizer\.steps: 30 -> 31\)"):
        pipeline.check_finished_stages(new, str(tmp_path), pipeline.stage_fingerprints(new))


def test_train_and_evaluate_refuses_before_touching_the_workdir(tmp_path):
    old = config()
    pipeline.write_run_info(old, str(tmp_path))
    write_stage(tmp_path, "tokenizer", pipeline.stage_fingerprints(old)["tokenizer"])
    before = (tmp_path / "config.json").read_text()
    with pytest.raises(pipeline.StaleStageError, match="stage 'tokenizer'.*wavelet.levels: 2 -> 1"):
        pipeline.train_and_evaluate(config(**{"wavelet.levels": 1}), str(tmp_path))
    assert (tmp_path / "config.json").read_text() == before  # still describes the finished stages
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "tokenizer", "versions.json"]


def test_a_summary_without_fingerprint_is_reused_with_a_warning(tmp_path, caplog):
    write_stage(tmp_path, "tokenizer", None)
    c = config()
    with caplog.at_level(logging.WARNING):
        pipeline.check_finished_stages(c, str(tmp_path), pipeline.stage_fingerprints(c))
    assert any("tokenizer" in r.getMessage() and "no inputs_sha256" in r.getMessage() for r in caplog.records)


def test_fingerprinted_task_records_inputs_sha256_in_the_loop_summary(tmp_path):
    task = loop.Task("toy", {"w": jnp.zeros(3)}, lambda s, i: ({"w": s["w"] + 1.0}, {}), total_steps=2,
                     params_of=lambda s: s, summary_extra=lambda: {"epsilon": 1.5})
    result = loop.run(pipeline._fingerprinted(task, "ab" * 32), str(tmp_path), checkpoint_every=10,
                      max_to_keep=1, log_every=1)
    summary = loop.read_summary(str(tmp_path))
    assert summary == result.summary
    assert (summary["inputs_sha256"], summary["epsilon"], summary["final_step"]) == ("ab" * 32, 1.5, 2)
