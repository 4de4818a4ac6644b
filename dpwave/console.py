"""What a run shows and keeps: a short console (one line per stage, progress bars, warnings, a closing summary)
and the full log in ``<workdir>/log.txt``, owner-only (0600): it holds the DP stage's step timestamps.

The libraries a run drives (Orbax, TFDS, absl, JAX) log hundreds of INFO lines per stage; they all go to the log
file (with the config and every stage's metrics), none to the console. The console shows the pipeline's
per-stage lines, warnings of dpwave itself, errors of anything, and the tqdm bars (which write to stderr
directly). In a multi-host run process k > 0 logs to ``log.process<k>.txt`` and shows errors only.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from typing import Any

from absl import logging as absl_logging

from dpwave import files

LOG = "log.txt"
_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_PIPELINE = os.path.join(_PACKAGE, "train", "pipeline.py")
_ABANDONED_TASK = "Task exception was never retrieved"
_FILE_FORMAT = "%(asctime)s %(levelname).1s %(name)s %(filename)s:%(lineno)d] %(message)s"


class _Console(logging.Filter):
    """Passes the pipeline's INFO lines (one per stage), dpwave's warnings and every error (errors only off
    process 0) except asyncio's "Task exception was never retrieved": those are reads of a damaged checkpoint
    that Orbax abandoned after dpwave handled the failure, logged whenever the task is collected (even after the
    run's one-line error), so they go to the log file only. asyncio's other errors still show."""

    def __init__(self) -> None:
        super().__init__()
        self.is_process0 = True

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "asyncio" and record.getMessage().startswith(_ABANDONED_TASK):
            return False
        if record.levelno >= logging.ERROR:
            return True
        if not self.is_process0:
            return False
        path = os.path.abspath(record.pathname)
        if record.levelno >= logging.WARNING:
            return path.startswith(_PACKAGE)
        return record.levelno == logging.INFO and path == _PIPELINE


class _ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        return message if record.levelno == logging.INFO else f"{record.levelname.lower()}: {message}"


class _LogFile(logging.Handler):
    """Every record, one line each, appended to a `files.Appender` (a local file or a bucket object).

    Records are held in memory until `start_log_file` (called once the run holds its workdir), so a command
    refused at the start leaves no workdir behind and a command refused by a held workdir writes nothing there.
    """

    def __init__(self, path: str) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter(_FILE_FORMAT))
        self.path = path
        self._out: files.Appender | None = None
        self._pending: list[str] = []
        self.started = False
        self._closed = self._failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if self._closed:  # records logged at interpreter exit, after logging.shutdown (e.g. asyncio's)
            return
        try:
            self._pending.append(self.format(record) + "\n")
            if self._out is None and self.started:
                self._out = files.Appender(self.path, private=True)
            if self._out is not None:
                self._out.write("".join(self._pending))
                self._pending.clear()
        except Exception as e:  # logging must not end the run, nor print a traceback between its messages
            if not self._failed:
                self._failed = True
                sys.stderr.write(f"dpwave: cannot write the log file {self.path}: {type(e).__name__}: {e}\n")

    def close(self) -> None:
        with self.lock:  # emit runs under the same lock: no record is written to a closed file
            self._closed = True
            if self._out is not None:
                self._out.close()
                self._out = None
        super().close()


class _ConsoleHandler(logging.StreamHandler):
    def __init__(self) -> None:
        super().__init__(sys.stderr)
        self.console = _Console()
        self.addFilter(self.console)
        self.setFormatter(_ConsoleFormatter())


def setup(workdir: str) -> None:
    """Routes every log record to the workdir's log file and the short selection to stderr (replacing absl's
    stderr handler on the root logger); Python warnings go to the log file. Call it before JAX's distributed
    setup, and `set_process_index` after it."""
    root = logging.getLogger()
    root.removeHandler(absl_logging.get_absl_handler())
    for handler in [h for h in root.handlers if isinstance(h, _LogFile | _ConsoleHandler)]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.INFO)
    absl_logging.set_verbosity(absl_logging.INFO)
    root.addHandler(_LogFile(os.path.join(workdir, LOG)))
    root.addHandler(_ConsoleHandler())
    logging.captureWarnings(True)


def start_log_file() -> None:
    """Writes the held records, and every later one, to the log file (the run now holds its workdir)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, _LogFile):
            handler.started = True


def set_process_index(index: int) -> str:
    """Process k > 0 of a multi-host run logs to ``log.process<k>.txt`` and shows errors only; returns the log
    file's path."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, _ConsoleHandler):
            handler.console.is_process0 = index == 0
        elif isinstance(handler, _LogFile) and index:
            handler.path = os.path.join(os.path.dirname(handler.path), f"log.process{index}.txt")
    return next(h.path for h in logging.getLogger().handlers if isinstance(h, _LogFile))


_SHORT = {"fd_cls": "FD-cls", "fd_lowpass": "FD-lowpass", "cond_accuracy": "conditioning accuracy", "fid": "FID"}


def _number(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def summary(workdir: str, log: str) -> str:
    """The closing lines of a finished run (after the pipeline's "run finished"): its privacy, headline metrics
    and where the results are."""
    from dpwave.evaluate import METRICS  # imported here: the console needs no evaluation code until the end

    metrics = files.read_json(os.path.join(workdir, "metrics.json"))
    epsilon, delta = metrics.get("epsilon"), metrics.get("delta")
    privacy = {
        "public_only": "public-only control (no model trained on private data, epsilon 0)",
        "tuning": "tuning run on public data (no privacy claim)",
    }.get(metrics.get("mode"))
    if privacy is None:
        privacy = ("non-private reference (epsilon inf)" if epsilon is None or not math.isfinite(float(epsilon))
                   else f"(epsilon {float(epsilon):.3g}, delta {float(delta):.3g})-differential privacy")
    shown = [f"{_SHORT.get(m, m.replace('_', ' '))} {_number(metrics[m])}" for m in METRICS
             if metrics.get(m) is not None]
    return "\n".join([
        f"  privacy:  {privacy}",
        f"  metrics:  {', '.join(shown) or 'none'}",
        f"  report:   {os.path.join(workdir, 'report.md')}",
        f"  samples:  {os.path.join(workdir, 'samples.png')}",
        f"  log:      {log}",
    ])
