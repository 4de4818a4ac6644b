"""Metrics: TensorBoard events (tensorboardX, no TensorFlow), a JSONL log, PNG grids, a progress bar.

Files under `workdir` (a local folder or a bucket; written by process 0 only, through `dpwave.files`):

    tensorboard/events.out.tfevents.*   scalars and images; tags are "<stage>/<name>"; one file
                                        per writer
    metrics.jsonl                       one {"step": .., "stage": .., **scalars} object per line,
                                        appended per write (strict JSON: NaN/Infinity as strings)
    images/<stage>_<name>_<step:08d>.png
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging
from etils import epath
from tqdm import tqdm

from dpwave import files, validation
from dpwave.grids import save_png

__all__ = ["MetricWriter", "Progress"]

_NAME = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise ValueError(f"{what} {name!r} is not a valid name; use letters, digits, '_', '.', '-' "
                         "and '/' between parts.")
    return name


def _to_scalar(name: str, value: Any) -> int | float:
    array = np.asarray(value)
    if array.size != 1 or array.dtype.kind not in "biuf":
        raise ValueError(f"metric {name!r} must be a real scalar, got {type(value).__name__} with "
                         f"shape {array.shape} and dtype {array.dtype}; reduce it (e.g. .mean()) first.")
    item = array.reshape(()).item()
    return int(item) if array.dtype.kind in "biu" else float(item)


class _EventFiles:
    """tensorboardX's writer factory for a bucket URI: event files are `files.Appender`s (epath)."""

    def open(self, path: str) -> files.Appender:
        return files.Appender(path, binary=True)

    def directory_check(self, path: str) -> None:
        files.makedirs(path)


class MetricWriter:
    """Writes scalars and images of one stage to TensorBoard, metrics.jsonl and PNG files.

    Only the writer with `is_process0=True` touches files; every process logs scalars.
    """

    def __init__(self, workdir: str | os.PathLike[str], *, is_process0: bool,
                 stage: str = "") -> None:
        self._workdir = files.as_path(workdir)
        self._stage = _check_name(stage, "stage") if stage else ""
        self._is_process0 = is_process0
        self._tb = None
        self._jsonl = None
        if is_process0:
            from tensorboardX import SummaryWriter, record_writer  # Imported lazily: only process 0 needs it.
            files.makedirs(self._workdir)
            if not files.is_local(self._workdir):
                record_writer.register_writer_factory(str(self._workdir).split("://")[0], _EventFiles())
            # tensorboardX names event files by the second: a unique suffix keeps two writers opened
            # in the same second (consecutive stages, a quick resume) from overwriting each other.
            self._tb = SummaryWriter(logdir=str(self._workdir / "tensorboard"), flush_secs=30,
                                     filename_suffix=f".{os.getpid()}.{uuid.uuid4().hex[:8]}")
            self._jsonl = files.Appender(self.jsonl_path)

    @property
    def jsonl_path(self) -> epath.Path:
        return self._workdir / "metrics.jsonl"

    def _tag(self, name: str) -> str:
        return f"{self._stage}/{name}" if self._stage else name

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Records `scalars` (name -> real scalar, e.g. loss, epsilon) at `step`."""
        values = {_check_name(k, "metric name"): _to_scalar(k, v) for k, v in scalars.items()}
        if {"step", "stage"} & values.keys():
            raise ValueError("metric names 'step' and 'stage' are reserved for the JSONL record; "
                             "rename the metric.")
        logging.info("[%s] step %d: %s", self._stage or "-", step,
                     ", ".join(f"{k}={v:.6g}" for k, v in values.items()))
        if not self._is_process0:
            return
        for name, value in values.items():
            self._tb.add_scalar(self._tag(name), value, step)
        record = {"step": int(step), "stage": self._stage, **values}
        self._jsonl.write(files.dumps_json(record) + "\n")

    def write_images(self, step: int, name: str, grid_uint8: np.ndarray) -> epath.Path | None:
        """Records one uint8 image (H, W[, C]) at `step`; returns its PNG path (None off process 0)."""
        _check_name(name, "image name")
        grid = validation.single_image(grid_uint8, "image")
        if not self._is_process0:
            logging.info("[%s] step %d: image %s %s", self._stage or "-", step, name, grid.shape)
            return None
        hwc = grid[..., None] if grid.ndim == 2 else grid
        self._tb.add_image(self._tag(name), hwc, step, dataformats="HWC")
        prefix = f"{self._stage.replace('/', '_')}_" if self._stage else ""
        filename = f"{prefix}{name.replace('/', '_')}_{int(step):08d}.png"
        return save_png(self._workdir / "images" / filename, grid)

    def flush(self) -> None:
        if self._is_process0:
            self._tb.flush()
            self._jsonl.flush()

    def close(self) -> None:
        if self._is_process0 and self._jsonl is not None:
            self._tb.close()
            self._jsonl.close()
            self._jsonl = None

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Progress:
    """A tqdm bar (steps/s, ETA, postfix such as epsilon) that touches tqdm only every `every` steps.

        with Progress(total=num_steps, initial=start_step, desc="dp-finetune") as bar:
          for step in ...:
            ...
            bar.update()
            bar.set_postfix(epsilon=eps)   # stored; shown at the next refresh
    """

    def __init__(self, total: int, initial: int = 0, desc: str = "", *, every: int = 10,
                 disable: bool = False) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}.")
        if total < 0 or not 0 <= initial <= total:
            raise ValueError(f"need 0 <= initial <= total, got initial={initial}, total={total}.")
        self._every = every
        self._pending = 0
        self._postfix: dict[str, Any] = {}
        self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                         disable=disable)

    @property
    def n(self) -> int:
        """Steps counted so far, including `initial` and not yet displayed ones."""
        return self._bar.n + self._pending

    def update(self, n: int = 1) -> None:
        self._pending += n
        if self._pending >= self._every:
            self._flush()

    def set_postfix(self, **values: Any) -> None:
        self._postfix.update(values)

    def _flush(self) -> None:
        if self._postfix:
            self._bar.set_postfix(self._postfix, refresh=False)
        self._bar.update(self._pending)
        self._pending = 0

    def close(self) -> None:
        self._flush()
        self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
