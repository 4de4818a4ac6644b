"""Stage fingerprints (`inputs_sha256`): what each stage depends on, the refusal of stale stages and of stale
checkpoints, `init_params_from`, and reusing a finished row's public stages in another row."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import runs

from dpwave.train import loop, pipeline, settings
from dpwave.train.fingerprints import StaleStageError
from dpwave.train.stages.pretrain import STAGE as PRETRAIN
from experiments.configs import mnist

ALL = ("tokenizer", "pretrain", "dp_finetune", "refiner", "sample", "evaluate")


def config(arg: str = "tiny", **overrides: Any):
    """`mnist.py:<arg>` with dotted-path overrides ({"dp.mechanism.delta": 1e-6})."""
    c = mnist.get_config(arg)
    with c.unlocked():
        for path, value in overrides.items():
            *parents, leaf = path.split(".")
            node = c
            for name in parents:
                node = node[name]
            node[leaf] = value
    return c


def fingerprints(c) -> dict[str, str]:
    return pipeline.stage_fingerprints(settings.read(c))


def inputs(c) -> dict[str, dict]:
    return pipeline.stage_inputs(settings.read(c))


def changed(a, b) -> set[str]:
    fa, fb = fingerprints(a), fingerprints(b)
    assert fa.keys() == fb.keys()
    return {name for name in fa if fa[name] != fb[name]}


@pytest.mark.integration
def test_fingerprints_cover_every_stage_and_are_deterministic():
    fps = fingerprints(config())
    assert list(fps) == list(ALL) == [stage.name for stage in pipeline.stages(settings.read(config()))]
    assert all(len(v) == 64 and int(v, 16) >= 0 for v in fps.values())
    assert len(set(fps.values())) == len(fps)  # the stage name is part of the inputs
    assert fingerprints(config()) == fps


@pytest.mark.integration
@pytest.mark.parametrize("path, value, stages", [
    ("dp.mechanism.target_epsilon", 1.0, {"dp_finetune", "sample", "evaluate"}),
    ("dp.mechanism.target_epsilon", float("inf"), {"dp_finetune", "sample", "evaluate"}),  # inf is fingerprinted too
    ("data.private.split", "private[:400]", {"dp_finetune", "sample", "evaluate"}),
    ("tokenizer.steps", 31, {"tokenizer", "pretrain", "dp_finetune", "sample", "evaluate"}),
    ("wavelet.mode", "zero", {"tokenizer", "pretrain", "dp_finetune", "refiner", "sample", "evaluate"}),
    ("transformer.width", 48, {"pretrain", "dp_finetune", "sample", "evaluate"}),
    ("pretrain.learning_rate", 3e-4, {"pretrain", "dp_finetune", "sample", "evaluate"}),
    ("refiner.steps", 31, {"refiner", "sample", "evaluate"}),
    ("data.condition", "none", {"pretrain", "dp_finetune", "refiner", "sample", "evaluate"}),
    ("seed", 1, set(ALL)),
    ("sample.temperature", 0.5, {"sample", "evaluate"}),
    ("eval.feature_epochs", 3, {"evaluate"}),
    # Neither changes a result: resume is exact, and every clipping path computes the same update.
    ("checkpoint.every_steps", 5, set()),
    ("perf.use_ghost_norms", False, set()),
    ("perf.microbatch_size", 4, set()),
    ("dp.operations.compose_on_resume", True, set()),
])
def test_a_field_changes_exactly_the_stages_that_depend_on_it(path, value, stages):
    assert changed(config(), config(**{path: value})) == stages


@pytest.mark.integration
def test_methods_share_the_stages_whose_inputs_they_share():
    dpwave, bicubic, full_dp = (fingerprints(config(f"tiny,method={m}")) for m in ("dpwave", "bicubic", "full_dp"))
    assert dpwave["tokenizer"] == bicubic["tokenizer"] == full_dp["tokenizer"]
    assert dpwave["pretrain"] == bicubic["pretrain"] != full_dp["pretrain"]  # coarse band vs all scales
    assert "refiner" in dpwave and "refiner" not in bicubic and "refiner" not in full_dp
    assert dpwave["sample"] != bicubic["sample"]
    # Epsilon rows of one method differ only from the DP stage on.
    eps1 = fingerprints(config("tiny,epsilon=1"))
    assert {k for k in dpwave if dpwave[k] != eps1[k]} == {"dp_finetune", "sample", "evaluate"}


def write_stage(workdir: Path, name: str, stage_inputs: dict | None) -> None:
    """A finished stage's summary as the loop writes it (no inputs: one written by an older dpwave)."""
    loop.write_summary(str(workdir / name), stage_inputs, {"stage": name, "params_sha256": "0" * 64})


@pytest.mark.integration
def test_matching_finished_stages_pass_the_check(tmp_path):
    c = config()
    for name in ("tokenizer", "pretrain", "refiner"):
        write_stage(tmp_path, name, inputs(c)[name])
    (tmp_path / "dp_finetune").mkdir()  # unfinished: resumes, not checked here
    pipeline.check_finished_stages(str(tmp_path), inputs(config("tiny,epsilon=1")))


@pytest.mark.integration
def test_a_stale_finished_stage_is_refused_naming_the_stage_and_the_changed_field(tmp_path):
    old = inputs(config())
    for name in ("tokenizer", "pretrain", "dp_finetune"):
        write_stage(tmp_path, name, old[name])
    with pytest.raises(StaleStageError, match=r"stage 'dp_finetune' .*dp\.target_epsilon: 10\.0 -> 1\.0"
                       r".*new --workdir") as info:
        pipeline.check_finished_stages(str(tmp_path), inputs(config("tiny,epsilon=1")))
    assert isinstance(info.value, ValueError) and "tokenizer" not in str(info.value)
    # A tokenizer change is reported at the tokenizer, the first stale stage; only its fields are named.
    new = inputs(config(**{"tokenizer.steps": 31, "sample.temperature": 0.5}))
    with pytest.raises(StaleStageError, match=r"stage 'tokenizer'.*changed: tokenizer\.steps: 30 -> 31\)"):
        pipeline.check_finished_stages(str(tmp_path), new)


@pytest.mark.integration
def test_train_and_evaluate_refuses_before_touching_the_workdir(tmp_path):
    old = config()
    pipeline.write_run_info(old, str(tmp_path))
    write_stage(tmp_path, "tokenizer", inputs(old)["tokenizer"])
    before = (tmp_path / "config.json").read_text()
    with pytest.raises(StaleStageError, match="stage 'tokenizer'.*tokenizer.model.mode: 'symmetric' -> 'zero'"):
        pipeline.train_and_evaluate(config(**{"wavelet.mode": "zero"}), str(tmp_path))
    assert (tmp_path / "config.json").read_text() == before  # still describes the finished stages
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "tokenizer", "versions.json"]


@pytest.mark.integration
def test_a_summary_without_fingerprint_is_reused_with_a_warning(tmp_path, caplog):
    write_stage(tmp_path, "tokenizer", None)
    with caplog.at_level(logging.WARNING):
        pipeline.check_finished_stages(str(tmp_path), inputs(config()))
    assert any("tokenizer" in r.getMessage() and "no inputs_sha256" in r.getMessage() for r in caplog.records)


def toy_task(**kw: Any) -> loop.Task:
    return loop.Task("toy", {"w": jnp.zeros(3)}, lambda s, b, i: ({"w": s["w"] + 1.0}, {}), total_steps=2,
                     params_of=lambda s: s, **kw)


@pytest.mark.integration
def test_the_loop_records_the_inputs_in_the_summary_and_every_checkpoint(tmp_path):
    task = toy_task(inputs={"stage": "toy", "lr": 0.5}, summary_extra=lambda: {"epsilon": 1.5})
    result = loop.run(task, str(tmp_path), checkpoint_every=1, max_to_keep=5, log_every=1)
    summary = loop.read_summary(str(tmp_path))
    assert summary == result.summary
    assert (summary["inputs"], summary["epsilon"], summary["final_step"]) == (task.inputs, 1.5, 2)
    assert summary["inputs_sha256"] == pipeline.fingerprints.sha256(task.inputs)
    metas = sorted((tmp_path / "checkpoints").glob("*/meta/metadata"))
    assert len(metas) == 2 and all(json.loads(p.read_text())["inputs"] == task.inputs for p in metas)


@pytest.mark.integration
def test_an_unfinished_stage_refuses_to_resume_under_changed_inputs(tmp_path):
    run = lambda task: loop.run(task, str(tmp_path), checkpoint_every=1, max_to_keep=5, log_every=1)
    run(dataclasses.replace(toy_task(inputs={"lr": 0.5, "steps": 2, "sigma": 1.0}), total_steps=1))
    with pytest.raises(StaleStageError, match=r"stage 'toy' was checkpointed under other inputs.*lr: 0\.5 -> 0\.25"):
        run(toy_task(inputs={"lr": 0.25, "steps": 2, "sigma": 1.0}))
    # Paths the stage reconciles itself on restore (the DP stage's mechanism: its ledger) may differ.
    restored = []
    assert run(toy_task(inputs={"lr": 0.5, "steps": 2, "sigma": 2.0}, reconciled_on_resume=("sigma",),
                        on_restore=restored.append)).finished
    assert restored and restored[0]["inputs"]["sigma"] == 1.0


# ---- init_params_from and reusing a finished row's public stages ------------------------------------
@pytest.mark.integration
def test_init_params_from_takes_only_the_parameters_of_a_stage_dir_or_a_workdir(base_workdir, tmp_path):
    source_dir = base_workdir / "pretrain"
    # Built (not run) in the base workdir, whose tokenizer it encodes with.
    from_workdir, from_stage = (runs.context(runs.tiny_config({"pretrain.init_params_from": str(path)}),
                                                base_workdir) for path in (base_workdir, source_dir))
    task = PRETRAIN.task(from_workdir)
    source = PRETRAIN.restore_params(from_workdir.settings, str(source_dir))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(task.init_state.params), jax.tree.leaves(source)))
    fresh = PRETRAIN.init(from_workdir.settings)[1].opt_state  # no Adam moments, no step count
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(task.init_state.opt_state), jax.tree.leaves(fresh)))
    # The fingerprint holds the source's parameters, not its path: a stage dir and its workdir give the same.
    recorded = loop.read_summary(str(source_dir))["params_sha256"]
    assert from_workdir.inputs["pretrain"]["pretrain"]["init_params_sha256"] == recorded
    assert from_workdir.inputs["pretrain"] == from_stage.inputs["pretrain"]
    assert from_workdir.inputs["pretrain"] != runs.context(runs.tiny_config(), tmp_path).inputs["pretrain"]
    with pytest.raises(ValueError, match=r"init_params_from=.*tokenizer'.* is a finished 'tokenizer' stage"):
        runs.context(runs.tiny_config({"pretrain.init_params_from": str(base_workdir / "tokenizer")}), tmp_path)
    with pytest.raises(ValueError, match="holds no finished 'pretrain' stage"):
        runs.context(runs.tiny_config({"pretrain.init_params_from": str(tmp_path)}), tmp_path)


@pytest.mark.e2e
@pytest.mark.slow  # 1-2 minutes: the stale refusal and reproduce's reuse have fast tests above and in test_reproduce
def test_public_stages_copied_from_a_finished_row_are_reused_and_stale_ones_refused(base_workdir, tmp_path):
    """What the paper configs document: copy a row's public stage directories into another row's workdir."""
    row = tmp_path / "eps1"
    row.mkdir()
    for name in ("tokenizer", "pretrain"):
        shutil.copytree(base_workdir / name, row / name)
    before = {p: p.stat().st_mtime_ns for p in row.glob("*/summary.json")}
    cheap = {"dp.mechanism.target_epsilon": 1.0, "dp.mechanism.steps": 2, "refiner.steps": 2, "sample.num_samples": 20,
             "sample.batch_size": 10, "eval.feature_epochs": 1, "eval.downstream_epochs": 1, "eval.num_real": 50}
    assert pipeline.train_and_evaluate(runs.tiny_config(cheap), str(row))
    assert {p: p.stat().st_mtime_ns for p in before} == before  # reused, not retrained
    assert loop.read_summary(str(row / "dp_finetune"))["final_step"] == 2
    stale = tmp_path / "stale"
    shutil.copytree(base_workdir / "tokenizer", stale / "tokenizer")
    with pytest.raises(StaleStageError, match=r"stage 'tokenizer'.*tokenizer\.steps: 2 -> 3"):
        pipeline.train_and_evaluate(runs.tiny_config({**cheap, "tokenizer.steps": 3}), str(stale))
