"""Multi-process setup (`jax.distributed`) and the 1-D `data` mesh used for data parallelism.

`maybe_initialize_distributed()` must run before any other JAX call. It initializes when the
environment asks for several processes, checked in this order:

  DPWAVE_DISTRIBUTED=off                       never initialize (single process)
  DPWAVE_COORDINATOR_ADDRESS, DPWAVE_NUM_PROCESSES, DPWAVE_PROCESS_ID
                                               explicit (all three; e.g. local CPU processes)
  DPWAVE_DISTRIBUTED=auto                      let JAX detect the cluster (TPU VM, Open MPI, ...)
  SLURM_JOB_ID with SLURM_NTASKS > 1           SLURM, one process per srun task (JAX reads SLURM_*)
  TPU_WORKER_HOSTNAMES (several), CLOUD_TPU_TASK_ID or MEGASCALE_COORDINATOR_ADDRESS
                                               TPU pod (JAX reads the TPU environment)

On CPU, cross-process collectives use gloo (jax 0.10's default `jax_cpu_collectives_implementation`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = [
    "ClusterSpec",
    "DATA_AXIS",
    "ProcessInfo",
    "detect_cluster",
    "make_data_mesh",
    "maybe_initialize_distributed",
    "replicate",
    "shard_batch",
]

DATA_AXIS = "data"
_EXPLICIT = ("DPWAVE_COORDINATOR_ADDRESS", "DPWAVE_NUM_PROCESSES", "DPWAVE_PROCESS_ID")
_SLURM_NEEDED = ("SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")
_TPU_MARKERS = ("CLOUD_TPU_TASK_ID", "MEGASCALE_COORDINATOR_ADDRESS")


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """How to call `jax.distributed.initialize`: explicit arguments or JAX's auto-detection."""
    kind: str  # "explicit" | "auto" | "slurm" | "tpu"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    index: int
    count: int

    @property
    def is_process0(self) -> bool:
        return self.index == 0


def _int_env(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise ValueError(f"{name}={environ[name]!r} is not an integer.") from None


def _explicit_spec(environ: Mapping[str, str]) -> ClusterSpec:
    missing = [k for k in _EXPLICIT if not environ.get(k)]
    if missing:
        raise ValueError(f"Explicit multi-process setup needs all of {', '.join(_EXPLICIT)}; "
                         f"missing {', '.join(missing)}. Set them all or none.")
    address = environ[_EXPLICIT[0]]
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"DPWAVE_COORDINATOR_ADDRESS={address!r} must be 'host:port', "
                         "e.g. '127.0.0.1:12345'.")
    num, pid = _int_env(environ, _EXPLICIT[1]), _int_env(environ, _EXPLICIT[2])
    if num < 1 or not 0 <= pid < num:
        raise ValueError(f"Need DPWAVE_NUM_PROCESSES >= 1 and 0 <= DPWAVE_PROCESS_ID < "
                         f"DPWAVE_NUM_PROCESSES, got {num} and {pid}.")
    return ClusterSpec("explicit", address, num, pid)


def detect_cluster(environ: Mapping[str, str] | None = None) -> ClusterSpec | None:
    """The multi-process setup the environment asks for (see module docstring), or None."""
    env = os.environ if environ is None else environ
    mode = env.get("DPWAVE_DISTRIBUTED", "").strip().lower()
    if mode not in ("", "auto", "off"):
        raise ValueError(f"DPWAVE_DISTRIBUTED={mode!r} is not one of 'auto', 'off' (or unset).")
    if mode == "off":
        return None
    if any(env.get(k) for k in _EXPLICIT):
        return _explicit_spec(env)
    if mode == "auto":
        return ClusterSpec("auto")
    if "SLURM_JOB_ID" in env and "SLURM_NTASKS" in env and _int_env(env, "SLURM_NTASKS") > 1:
        missing = [k for k in _SLURM_NEEDED if k not in env]
        if missing:
            raise ValueError(
                f"SLURM_NTASKS={env['SLURM_NTASKS']} but {', '.join(missing)} unset: start one process "
                "per task with `srun` (see launch/slurm.sbatch), or set DPWAVE_DISTRIBUTED=off to run "
                "a single process.")
        return ClusterSpec("slurm")
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1 or any(
        k in env for k in _TPU_MARKERS):
        return ClusterSpec("tpu")
    return None


def maybe_initialize_distributed(*, initialization_timeout: int = 300) -> ProcessInfo:
    """Calls `jax.distributed.initialize` if the environment asks for it; idempotent.

    Returns this process's index and the process count.
    """
    if not jax.distributed.is_initialized():
        spec = detect_cluster()
        if spec is not None:
            logging.info("Initializing jax.distributed (%s).", spec.kind)
            if spec.kind == "explicit":
                jax.distributed.initialize(
                    coordinator_address=spec.coordinator_address, num_processes=spec.num_processes,
                    process_id=spec.process_id, cluster_detection_method="deactivate",
                    initialization_timeout=initialization_timeout)
            else:
                jax.distributed.initialize(initialization_timeout=initialization_timeout)
    info = ProcessInfo(jax.process_index(), jax.process_count())
    logging.info("Process %d of %d, %d local / %d global devices.", info.index, info.count,
                 jax.local_device_count(), jax.device_count())
    return info


def make_data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """1-D mesh with axis `data` over `devices` (default: all devices of all processes)."""
    # Auto axis types: the jitted steps are written for the whole batch and partitioned by XLA (or
    # by `shard_map` where per-device code is needed), not with sharding-in-types.
    auto = (jax.sharding.AxisType.Auto,)
    if devices is None:
        return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), auto)
    return jax.make_mesh((len(devices),), (DATA_AXIS,), auto, devices=list(devices))


def _check_data_mesh(mesh: Mesh) -> None:
    if DATA_AXIS not in mesh.axis_names:
        raise ValueError(f"mesh axes {mesh.axis_names} lack {DATA_AXIS!r}; build it with "
                         "make_data_mesh().")


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Global arrays from each process's host-local batch, split along `data` (leading axis).

    Every process passes its own slice with the same shape; the global leading size is
    local size x process count. The local leading size must divide by the local device count.
    """
    _check_data_mesh(mesh)
    sharding = NamedSharding(mesh, P(DATA_AXIS))
    local_devices = len({d for d in mesh.devices.flat if d.process_index == jax.process_index()})

    def put(x: Any) -> jax.Array:
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[0] % local_devices:
            raise ValueError(f"a host-local batch leaf of shape {x.shape} cannot be split over "
                             f"{local_devices} local devices; make the per-process batch size a "
                             f"multiple of {local_devices}.")
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Copies a pytree (identical on every process) to all devices of `mesh`, replicated."""
    sharding = NamedSharding(mesh, P())
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(x: Any) -> jax.Array:
        if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(x)), dtype=x.dtype)
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(sharding, x, x.shape)

    return jax.tree.map(put, tree)


def local_slice(indices: np.ndarray) -> np.ndarray:
    """This process's contiguous share of a global batch of indices (all processes draw the same)."""
    return np.asarray(indices).reshape(jax.process_count(), -1)[jax.process_index()]
