"""`train_and_evaluate(config, workdir)`: a run as an ordered list of stages, each in its own directory.

    tokenizer (public) -> pretrain (public) -> dp_finetune (private, DP) -> refiner (public, dpwave only)
    -> sample -> evaluate
    dp_embedding (private, DP: the DP-MERF release) -> generator -> refiner (public, dpwave_merf only)
    -> sample -> evaluate
    pixel_pretrain (public) -> dp_diffusion (private, DP) -> sample -> evaluate

`PIPELINES` lists each method's stages (`dpwave/train/stages/`, one module per stage); adding a stage is one
module and one entry here. The config is read once (`settings.read`). A stage with a `summary.json` is
finished and skipped; an unfinished one resumes from its newest checkpoint. A preempted stage returns early
and the same command continues it. The resolved config and the package versions are written to the workdir.

Every summary and checkpoint records the stage's inputs and `inputs_sha256` (`fingerprints`): the settings it
reads and the fingerprints of the stages it consumes. A finished stage whose fingerprint differs from the
current config's is refused (`StaleStageError`), and so is resuming a checkpoint written under other inputs:
a config change never reuses stale results. Equal fingerprints let `experiments/reproduce.py` share the
public stages between table rows.

`train_and_evaluate` is `prepare` (every check, before anything is written: a refused command leaves no workdir)
then `execute`, which runs the stages while holding the workdir's lock (`workdir_lock`: one run per workdir).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import platform
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from absl import logging

from dpwave.train import distributed, fingerprints, loop, secret_seed, settings as settings_lib, workdir_lock
from dpwave.train.hashing import config_fingerprint
from dpwave.train.fingerprints import StaleStageError
from dpwave.train.settings import Settings
from dpwave.train.stages.base import Context, Stage
from dpwave.train.stages.dp_diffusion import STAGE as DP_DIFFUSION
from dpwave.train.stages.dp_embedding import STAGE as DP_EMBEDDING
from dpwave.train.stages.dp_finetune import STAGE as DP_FINETUNE
from dpwave.train.stages.evaluate import STAGE as EVALUATE
from dpwave.train.stages.generator import STAGE as GENERATOR
from dpwave.train.stages.pixel_pretrain import STAGE as PIXEL_PRETRAIN
from dpwave.train.stages.pretrain import STAGE as PRETRAIN
from dpwave.train.stages.refiner import STAGE as REFINER
from dpwave.train.stages.sample import STAGE as SAMPLE
from dpwave.train.stages.tokenizer import STAGE as TOKENIZER

PIPELINES: dict[str, tuple[Stage, ...]] = {
    "dpwave": (TOKENIZER, PRETRAIN, DP_FINETUNE, REFINER, SAMPLE, EVALUATE),
    "full_dp": (TOKENIZER, PRETRAIN, DP_FINETUNE, SAMPLE, EVALUATE),  # the baseline: every scale under DP
    "bicubic": (TOKENIZER, PRETRAIN, DP_FINETUNE, SAMPLE, EVALUATE),  # coarse under DP, bicubic upsampling
    "dp_merf": (DP_EMBEDDING, GENERATOR, SAMPLE, EVALUATE),  # DP-MERF (Harder et al. 2021) in pixel space
    "dpwave_merf": (DP_EMBEDDING, GENERATOR, REFINER, SAMPLE, EVALUATE),  # its release of the coarse band
    "dp_diffusion": (PIXEL_PRETRAIN, DP_DIFFUSION, SAMPLE, EVALUATE),  # a pixel flow model, DP-SGD finetuned
}
assert tuple(PIPELINES) == settings_lib.METHODS
PACKAGES = ("jax", "jaxlib", "flax", "optax", "dp-accounting", "jaxwt", "tensorflow-datasets", "ml-collections",
            "orbax-checkpoint", "numpy", "dpwave")

__all__ = ["PIPELINES", "Plan", "StaleStageError", "execute", "prepare", "stage_inputs", "stages",
           "train_and_evaluate"]


def stages(settings: Settings) -> list[Stage]:
    """The run's stages in order; the public-only control (dp.mechanism.target_epsilon=0) has no DP stage."""
    return [stage for stage in PIPELINES[settings.method] if stage.enabled(settings)]


def stage_inputs(settings: Settings) -> dict[str, dict[str, Any]]:
    """Every stage's inputs: its name, the settings it reads and the fingerprints of the stages it consumes."""
    out: dict[str, dict[str, Any]] = {}
    for stage in stages(settings):
        consumed = {name: fingerprints.sha256(out[name]) for name in stage.consumes if name in out}
        out[stage.name] = {"stage": stage.name, **stage.inputs(settings), "consumes": consumed}
    return out


def stage_fingerprints(settings: Settings) -> dict[str, str]:
    """`inputs_sha256` of every stage of the run."""
    return {name: fingerprints.sha256(inputs) for name, inputs in stage_inputs(settings).items()}


def check_finished_stages(workdir: str, inputs: dict[str, dict[str, Any]]) -> None:
    """Raises `StaleStageError` for the first finished stage of `workdir` whose recorded `inputs_sha256` differs
    from `inputs`' (a summary without one, written before fingerprints existed, is only warned about)."""
    for name, expected in inputs.items():
        summary = loop.read_summary(os.path.join(workdir, name))
        if summary is None:
            continue
        recorded = summary.get("inputs_sha256")
        if recorded is None:
            logging.warning("stage %s in %s records no inputs_sha256 (written by an older dpwave); it cannot be "
                            "checked against this config and is reused as is", name, workdir)
        elif recorded != fingerprints.sha256(expected):
            changed = fingerprints.changed(summary["inputs"], expected) if "inputs" in summary else []
            raise StaleStageError(
                f"stage {name!r} in {os.path.join(workdir, name)} was finished from other inputs than this config "
                f"gives (inputs_sha256 {recorded[:12]}... recorded, {fingerprints.sha256(expected)[:12]}... now"
                + (f"; changed: {', '.join(changed)}" if changed else "") + "); a finished stage is never "
                "reused after a config change: rerun with a new --workdir")


def resolved_config(config: ml_collections.ConfigDict) -> dict:
    """The config as plain JSON values; non-finite floats (epsilon inf) as the strings "Infinity"/"NaN"."""
    return json.loads(config.to_json_best_effort(), parse_constant=str)


def write_run_info(config: ml_collections.ConfigDict, workdir: str) -> None:
    """config.json (resolved, with its fingerprint) and versions.json."""
    resolved = resolved_config(config)
    loop.write_json_atomic(os.path.join(workdir, "config.json"),
                           {"fingerprint": config_fingerprint(resolved), "config": resolved})
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    loop.write_json_atomic(os.path.join(workdir, "versions.json"), {
        "python": platform.python_version(), "packages": versions,
        "devices": [str(d) for d in jax.devices()], "process_count": jax.process_count()})


@dataclasses.dataclass(frozen=True)
class Plan:
    """A run that passed `prepare`'s checks: its config, settings, absolute workdir, stages and their inputs."""

    config: ml_collections.ConfigDict
    settings: Settings
    workdir: str
    stages: tuple[Stage, ...]
    inputs: dict[str, dict[str, Any]]


def prepare(config: ml_collections.ConfigDict, workdir: str) -> Plan:
    """Every check a run makes before it writes anything: float32 defaults, the config (`settings.read`), the DP
    secret seed, the finished stages' inputs, the privacy boundary and content of every data role, and the DP
    settings against the DP input's size (the last two open the data).

    Raises:
      ValueError: a config, data, secret-seed or stale-stage error, naming the fix (nothing is written).
    """
    if jax.config.jax_enable_x64:
        raise ValueError("dpwave expects float32 defaults; unset JAX_ENABLE_X64")
    settings = settings_lib.read(config)
    workdir = workdir if "://" in workdir else os.path.abspath(workdir)  # gs://bucket/run stays a bucket path
    run_stages = tuple(stages(settings))
    dp_stage = next((stage for stage in run_stages if stage.dp), None)
    dp_to_run = dp_stage is not None and loop.read_summary(os.path.join(workdir, dp_stage.name)) is None
    if dp_to_run:
        given = secret_seed.seed_source(settings.dp)  # a bad or short DP secret fails before anything is written
        if given is not None:
            secret_seed.check_strength(*given, os.path.join(workdir, dp_stage.name))
    inputs = stage_inputs(settings)
    check_finished_stages(workdir, inputs)
    # Every mode, before any training step: split tags of every role, and no private image in a public role.
    settings.data.check_boundary()
    if dp_to_run:  # an expected batch larger than the private set fails now, not after the public stages
        settings.check_dp_input()
    return Plan(config, settings, workdir, run_stages, inputs)


def execute(plan: Plan, on_hold: Callable[[], None] = lambda: None) -> bool:
    """Runs (or resumes) every stage of `plan` while holding its workdir; True when the whole run is finished.
    `on_hold` runs once the workdir is held (the CLI starts its log file there).

    Raises:
      workdir_lock.WorkdirLockedError: another process runs in the workdir (nothing is written).
    """
    workdir = plan.workdir
    with workdir_lock.hold(workdir):
        on_hold()
        check_finished_stages(workdir, plan.inputs)  # again, locked: a run that held the workdir may have finished one
        write_run_info(plan.config, workdir)
        ctx = Context(plan.settings, workdir, distributed.make_data_mesh(), plan.inputs)
        for stage in plan.stages:
            if loop.read_summary(ctx.dir(stage.name)) is not None:
                logging.info("stage %s already finished; skipping", stage.name)
                continue
            logging.info("stage %s: starting or resuming in %s", stage.name, ctx.dir(stage.name))
            if not stage.run(ctx):
                logging.warning("stopped during stage %s; rerun the same command to resume", stage.name)
                return False
    logging.info("run finished: %s", workdir)
    return True


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> bool:
    """Runs (or resumes) every stage; returns True when the whole run is finished."""
    return execute(prepare(config, workdir))
