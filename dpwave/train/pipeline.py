"""`train_and_evaluate(config, workdir)`: a run as a sequence of stages, each in its own directory.

    tokenizer (public) -> pretrain (public) -> dp_finetune (private, DP) -> refiner (public, dpwave only)
    -> sample -> evaluate

A stage with a `summary.json` is finished and skipped; an unfinished one resumes from its newest
checkpoint. A preempted stage returns early and the same command continues it. The resolved config
and the package versions are written to the workdir.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
from typing import Callable

import jax
import ml_collections
from absl import logging

from dpwave.train import builders, distributed, loop, public_stages, report_stages
from dpwave.train.checkpoint import config_fingerprint
from dpwave.train.dp_stage import DpFinetune

PACKAGES = ("jax", "jaxlib", "flax", "optax", "dp-accounting", "jaxwt", "tensorflow-datasets", "ml-collections",
            "orbax-checkpoint", "numpy", "dpwave")


def stage_names(config: ml_collections.ConfigDict) -> list[str]:
    names = ["tokenizer", "pretrain", "dp_finetune"]
    if builders.check_method(config) == "dpwave":
        names.append("refiner")
    return names + ["sample", "evaluate"]


def write_run_info(config: ml_collections.ConfigDict, workdir: str) -> None:
    """config.json (resolved, with its fingerprint) and versions.json; warns if the config changed."""
    path = os.path.join(workdir, "config.json")
    resolved = json.loads(config.to_json_best_effort())
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        if previous.get("fingerprint") != config_fingerprint(resolved):
            logging.warning("config differs from the one this workdir was started with (%s); finished stages are "
                            "kept, the DP stage refuses changed DP hyperparameters", path)
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
    os.makedirs(workdir, exist_ok=True)
    write_run_info(config, workdir)
    mesh = distributed.make_data_mesh()
    dirs = {name: os.path.join(workdir, name) for name in stage_names(config)}
    runners: dict[str, Callable[[], loop.LoopResult | None]] = {
        "tokenizer": lambda: public_stages.run_task(config, public_stages.tokenizer_task(config, mesh),
                                                    dirs["tokenizer"]),
        "pretrain": lambda: public_stages.run_task(
            config, public_stages.pretrain_task(config, mesh, dirs["tokenizer"]), dirs["pretrain"]),
        "dp_finetune": lambda: _run_dp(config, mesh, dirs),
        "refiner": lambda: public_stages.run_task(config, public_stages.refiner_task(config, mesh), dirs["refiner"]),
        "sample": lambda: report_stages.sample_stage(config, workdir, dirs),
        "evaluate": lambda: report_stages.evaluate_stage(config, workdir, dirs),
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


def _run_dp(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, dirs: dict[str, str]) -> loop.LoopResult:
    stage = DpFinetune(config, mesh, stage_dir=dirs["dp_finetune"], tokenizer_dir=dirs["tokenizer"],
                       pretrain_dir=dirs["pretrain"])
    return public_stages.run_task(config, stage.task(), dirs["dp_finetune"],
                                  postfix=lambda: {"eps": f"{stage.last_epsilon:.3g}"})
