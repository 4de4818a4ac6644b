"""`train_and_evaluate(config, workdir)`: a run as a sequence of stages, each in its own directory.

    tokenizer (public) -> pretrain (public) -> dp_finetune (private, DP) -> refiner (public, dpwave only)
    -> sample -> evaluate

A stage with a `summary.json` is finished and skipped; an unfinished one resumes from its newest
checkpoint. A preempted stage returns early and the same command continues it. The resolved config
and the package versions are written to the workdir.

Each summary records `inputs_sha256`: the fingerprint of the config fields the stage's result depends on
and of the stages it consumes (`STAGE_INPUTS`). A finished stage whose fingerprint differs from the
current config's is refused (`StaleStageError`): a config change never reuses stale results. Equal
fingerprints let `experiments/reproduce.py` share the public stages between table rows.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import platform
from typing import Any, Callable

import jax
import ml_collections
from absl import logging

from dpwave.train import builders, distributed, dp_recipe, loop, public_stages, report_stages
from dpwave.train.checkpoint import config_fingerprint
from dpwave.train.dp_stage import DpFinetune, seed_source

PACKAGES = ("jax", "jaxlib", "flax", "optax", "dp-accounting", "jaxwt", "tensorflow-datasets", "ml-collections",
            "orbax-checkpoint", "numpy", "dpwave")


def stage_names(config: ml_collections.ConfigDict) -> list[str]:
    """The run's stages; the public-only control (dp.target_epsilon=0) has no DP stage."""
    dp_recipe.check(config)
    names = ["tokenizer", "pretrain"] + ([] if dp_recipe.public_only(config) else ["dp_finetune"])
    if builders.check_method(config) == "dpwave":
        names.append("refiner")
    return names + ["sample", "evaluate"]


# Per stage: the config fields its result depends on (dotted paths; "" is the whole config) and the stages
# it consumes. Logging and checkpoint frequency do not change a training stage's result (resume is exact).
STAGE_INPUTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "tokenizer": (("seed", "data.public", "data.image_size", "data.channels", "wavelet", "tokenizer"), ()),
    "pretrain": (("seed", "data.public", "data.image_size", "data.channels", "data.condition", "data.num_classes",
                  "transformer", "pretrain"), ("tokenizer",)),
    "dp_finetune": (("dp", "data.private"), ("tokenizer", "pretrain")),
    "refiner": (("seed", "data.public", "data.image_size", "data.channels", "data.condition", "data.num_classes",
                 "wavelet", "refiner"), ()),
    "sample": (("",), ("tokenizer", "pretrain", "dp_finetune", "refiner")),
    "evaluate": (("",), ("sample",)),
}


class StaleStageError(ValueError):
    """A finished stage was computed from other inputs than the current config gives."""


def resolved_config(config: ml_collections.ConfigDict) -> dict:
    """The config as plain JSON values; non-finite floats (epsilon inf) as the strings "Infinity"/"NaN"."""
    return json.loads(config.to_json_best_effort(), parse_constant=str)


def _field(resolved: dict, path: str) -> Any:
    for name in filter(None, path.split(".")):
        resolved = resolved[name]
    return resolved


def stage_fingerprints(config: ml_collections.ConfigDict) -> dict[str, str]:
    """`inputs_sha256` of every stage of `config`'s run: `config_fingerprint` of the stage's fields in
    `STAGE_INPUTS`, the fingerprints of the stages it consumes, and (pretrain) the method's choice of
    modelling the coarse scale only or all scales."""
    resolved, names, out = resolved_config(config), stage_names(config), {}
    for name in names:
        fields, consumes = STAGE_INPUTS[name]
        inputs = {"stage": name, "fields": {path: _field(resolved, path) for path in fields},
                  "consumes": {c: out[c] for c in consumes if c in names}}
        if name == "pretrain":
            inputs["coarse_only"] = builders.coarse_only(config)
        out[name] = config_fingerprint(inputs)
    return out


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for name, sub in tree.items()
            for k, v in _flatten(sub, f"{prefix}.{name}" if prefix else name).items()}


def _changed_fields(previous: dict, current: dict, stage: str) -> list[str]:
    """'path: old -> new' for the config leaves `stage` depends on (directly or through the stages it
    consumes) that differ between two resolved configs."""
    pending, seen = [stage], set()
    while pending:
        seen.add(name := pending.pop())
        pending.extend(STAGE_INPUTS[name][1])
    fields = {f for name in seen for f in STAGE_INPUTS[name][0]} | ({"method"} if "pretrain" in seen else set())
    old, new = _flatten(previous), _flatten(current)
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k) and any(f in ("", k) or k.startswith(f + ".") for f in fields)]


def check_finished_stages(config: ml_collections.ConfigDict, workdir: str, fingerprints: dict[str, str]) -> None:
    """Raises `StaleStageError` for the first finished stage of `workdir` whose recorded `inputs_sha256`
    differs from `fingerprints` (a summary without one, written before fingerprints existed, is only
    warned about). Call it before `write_run_info`, whose config.json names the changed fields."""
    previous = None
    if os.path.exists(path := os.path.join(workdir, "config.json")):
        with open(path) as f:
            previous = json.load(f).get("config")
    for name, expected in fingerprints.items():
        summary = loop.read_summary(os.path.join(workdir, name))
        if summary is None:
            continue
        recorded = summary.get("inputs_sha256")
        if recorded is None:
            logging.warning("stage %s in %s records no inputs_sha256 (written by an older dpwave); it cannot be "
                            "checked against this config and is reused as is", name, workdir)
        elif recorded != expected:
            changed = _changed_fields(previous, resolved_config(config), name) if previous is not None else []
            raise StaleStageError(
                f"stage {name!r} in {os.path.join(workdir, name)} was finished from other inputs than this config "
                f"gives (inputs_sha256 {recorded[:12]}... recorded, {expected[:12]}... now"
                + (f"; changed: {', '.join(changed)}" if changed else "") + "); a finished stage is never "
                "reused after a config change: rerun with a new --workdir")


def _fingerprinted(task: loop.Task, inputs_sha256: str) -> loop.Task:
    """`task` whose summary.json also records `inputs_sha256`."""
    extra = task.summary_extra
    return dataclasses.replace(task, summary_extra=lambda: {**extra(), "inputs_sha256": inputs_sha256})


def write_run_info(config: ml_collections.ConfigDict, workdir: str) -> None:
    """config.json (resolved, with its fingerprint) and versions.json; warns if the config changed."""
    path = os.path.join(workdir, "config.json")
    resolved = resolved_config(config)
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        if previous.get("fingerprint") != config_fingerprint(resolved):
            logging.warning("config differs from the one this workdir was started with (%s); the finished stages "
                            "do not depend on the changed fields (their inputs_sha256 match)", path)
    loop.write_json_atomic(path, {"fingerprint": config_fingerprint(resolved), "config": resolved})
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    loop.write_json_atomic(os.path.join(workdir, "versions.json"), {
        "python": platform.python_version(), "packages": versions,
        "devices": [str(d) for d in jax.devices()], "process_count": jax.process_count()})


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> bool:
    """Runs (or resumes) every stage; returns True when the whole run is finished."""
    if jax.config.jax_enable_x64:
        raise ValueError("dpwave expects float32 defaults; unset JAX_ENABLE_X64")
    workdir = os.path.abspath(workdir)
    if loop.read_summary(os.path.join(workdir, "dp_finetune")) is None:
        seed_source(config)  # a bad DP secret seed file or variable fails before anything runs or is written
    os.makedirs(workdir, exist_ok=True)
    fps = stage_fingerprints(config)
    check_finished_stages(config, workdir, fps)
    if not (dp_recipe.public_only(config) or config.dp.tuning):  # these runs read no private data at all
        builders.check_data_boundary(config)  # before any training step: no private image in a public role
    write_run_info(config, workdir)
    mesh = distributed.make_data_mesh()
    dirs = {name: os.path.join(workdir, name) for name in stage_names(config)}
    runners: dict[str, Callable[[], loop.LoopResult | None]] = {
        "tokenizer": lambda: public_stages.run_task(
            config, _fingerprinted(public_stages.tokenizer_task(config, mesh), fps["tokenizer"]), dirs["tokenizer"]),
        "pretrain": lambda: public_stages.run_task(config, _fingerprinted(
            public_stages.pretrain_task(config, mesh, dirs["tokenizer"]), fps["pretrain"]), dirs["pretrain"]),
        "dp_finetune": lambda: _run_dp(config, mesh, dirs, fps["dp_finetune"]),
        "refiner": lambda: public_stages.run_task(
            config, _fingerprinted(public_stages.refiner_task(config, mesh), fps["refiner"]), dirs["refiner"]),
        "sample": lambda: report_stages.sample_stage(config, workdir, dirs, inputs_sha256=fps["sample"]),
        "evaluate": lambda: report_stages.evaluate_stage(config, workdir, dirs, inputs_sha256=fps["evaluate"]),
    }
    for name in stage_names(config):
        if loop.read_summary(dirs[name]) is not None:
            logging.info("stage %s already finished; skipping", name)
            continue
        logging.info("stage %s: starting or resuming in %s", name, dirs[name])
        result = runners[name]()
        if result is not None and not result.finished:
            logging.warning("stopped during stage %s; rerun the same command to resume", name)
            return False
    logging.info("run finished: %s", workdir)
    return True


def _run_dp(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, dirs: dict[str, str],
            inputs_sha256: str) -> loop.LoopResult:
    stage = DpFinetune(config, mesh, stage_dir=dirs["dp_finetune"], tokenizer_dir=dirs["tokenizer"],
                       pretrain_dir=dirs["pretrain"])
    return public_stages.run_task(config, _fingerprinted(stage.task(), inputs_sha256), dirs["dp_finetune"],
                                  postfix=lambda: {"eps": f"{stage.last_epsilon:.3g}"})
