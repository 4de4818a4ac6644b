"""dpwave.console: the short console, the full log file (held until the workdir exists) and the closing summary."""
import logging
import math
import os

import pytest
from absl import logging as absl_logging
from helpers.fake_bucket import fake_bucket

from dpwave import console, files

pytestmark = pytest.mark.unit

_PIPELINE = os.path.join(os.path.dirname(console.__file__), "train", "pipeline.py")


@pytest.fixture
def restore_logging():
    """Puts the root and absl loggers back as they were (set_verbosity would pin absl's level)."""
    root, absl_logger = logging.getLogger(), absl_logging.get_absl_logger()
    handlers, level, absl_level = list(root.handlers), root.level, absl_logger.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)
    absl_logger.setLevel(absl_level)
    logging.captureWarnings(False)


def _record(level: int, path: str, message: str) -> logging.LogRecord:
    return logging.LogRecord("absl", level, path, 1, message, None, None)


def test_console_shows_stage_lines_dpwave_warnings_and_errors():
    keep = console._Console().filter
    assert keep(_record(logging.INFO, _PIPELINE, "stage tokenizer: starting"))
    assert not keep(_record(logging.INFO, "/site-packages/orbax/checkpoint/manager.py", "saving"))
    assert not keep(_record(logging.INFO, console.__file__, "config: ..."))
    assert keep(_record(logging.WARNING, console.__file__, "a dpwave warning"))
    assert not keep(_record(logging.WARNING, "/site-packages/tensorflow_datasets/core.py", "custom config"))
    assert keep(_record(logging.ERROR, "/site-packages/orbax/x.py", "failed"))
    abandoned_read = logging.LogRecord("asyncio", logging.ERROR, "/lib/asyncio/base_events.py", 1,
                                       "Task exception was never retrieved", None, None)
    assert not keep(abandoned_read)
    other_asyncio_error = logging.LogRecord("asyncio", logging.ERROR, "/lib/asyncio/base_events.py", 1,
                                            "Exception in callback Loop.call_soon()", None, None)
    assert keep(other_asyncio_error)
    off_process0 = console._Console()
    off_process0.is_process0 = False
    assert not off_process0.filter(_record(logging.INFO, _PIPELINE, "stage tokenizer: starting"))
    assert off_process0.filter(_record(logging.ERROR, _PIPELINE, "failed"))


def test_log_file_waits_until_the_run_holds_its_workdir_then_keeps_everything(tmp_path, restore_logging, capsys):
    workdir = tmp_path / "run"
    console.setup(str(workdir))
    assert console.set_process_index(0) == str(workdir / "log.txt")
    absl_logging.info("config: before the workdir exists")
    logging.getLogger("orbax").info("an Orbax internal")
    assert not workdir.exists()  # a command refused at the start leaves no workdir
    workdir.mkdir()
    absl_logging.info("the workdir exists, held by another run")
    assert not (workdir / "log.txt").exists()  # a command refused by a held workdir writes nothing there
    console.start_log_file()
    absl_logging.error("a failure")
    text = (workdir / "log.txt").read_text()
    assert "config: before the workdir exists" in text and "an Orbax internal" in text and "a failure" in text
    assert "held by another run" in text
    assert capsys.readouterr().err == "error: a failure\n"


def test_other_processes_log_to_their_own_file(tmp_path, restore_logging):
    console.setup(str(tmp_path))
    assert console.set_process_index(3) == str(tmp_path / "log.process3.txt")
    console.start_log_file()
    absl_logging.info("hello")
    assert "hello" in (tmp_path / "log.process3.txt").read_text() and not (tmp_path / "log.txt").exists()


def test_log_file_on_a_bucket(restore_logging):
    with fake_bucket():
        files.makedirs("gs://bucket/run")
        console.setup("gs://bucket/run")
        console.start_log_file()
        absl_logging.info("first line")
        for handler in logging.getLogger().handlers:
            handler.flush()
        logging.getLogger().handlers[-2].close()
        assert "first line" in files.read_text("gs://bucket/run/log.txt")


@pytest.mark.parametrize("mode, epsilon, expected", [
    ("dp", 9.947, "(epsilon 9.95, delta 1e-05)-differential privacy"),
    ("dp", None, "non-private reference (epsilon inf)"),
    ("public_only", 0.0, "public-only control"),
    ("tuning", None, "tuning run on public data"),
])
def test_summary_names_privacy_metrics_and_paths(tmp_path, mode, epsilon, expected):
    files.write_json(tmp_path / "metrics.json", {"mode": mode, "epsilon": epsilon, "delta": 1e-5, "fd_cls": 26.1,
                                                 "precision": 0.83, "recall": None, "fid": math.inf})
    text = console.summary(str(tmp_path), str(tmp_path / "log.txt"))
    assert expected in text
    assert "FD-cls 26.1, precision 0.83, FID Infinity" in text and "recall" not in text
    for name in ("report.md", "samples.png", "log.txt"):
        assert str(tmp_path / name) in text


def test_the_log_is_owner_only_even_when_an_older_run_left_it_world_readable(tmp_path, restore_logging):
    """It holds the DP stage's step timestamps (a timing channel of the Poisson draws)."""
    (tmp_path / "log.txt").write_text("an older run's line\n")
    (tmp_path / "log.txt").chmod(0o644)
    console.setup(str(tmp_path))
    console.set_process_index(0)
    console.start_log_file()
    absl_logging.info("[dp_finetune] step 3: epsilon=0.5")
    assert (tmp_path / "log.txt").stat().st_mode & 0o777 == 0o600
    assert "an older run's line" in (tmp_path / "log.txt").read_text()
    other = tmp_path / "other"
    other.mkdir()
    console.setup(str(other))
    console.set_process_index(2)
    console.start_log_file()
    absl_logging.info("another process")
    assert (other / "log.process2.txt").stat().st_mode & 0o777 == 0o600


def test_records_after_the_log_file_closed_are_dropped_without_a_traceback(tmp_path, restore_logging, capsys):
    """At interpreter exit asyncio may log after logging.shutdown closed the handlers (a damaged checkpoint's reads
    ending late): nothing may reach stderr but the run's own lines."""
    console.setup(str(tmp_path))
    console.set_process_index(0)
    console.start_log_file()
    absl_logging.info("before")
    for handler in logging.getLogger().handlers:  # what logging.shutdown does to it at exit
        if isinstance(handler, console._LogFile):
            handler.close()
    logging.getLogger("asyncio").info("Task exception was never retrieved")
    assert "Traceback" not in capsys.readouterr().err
    assert "before" in (tmp_path / "log.txt").read_text()
    assert "never retrieved" not in (tmp_path / "log.txt").read_text()


def test_a_log_file_that_cannot_be_written_is_one_line_once(tmp_path, restore_logging, capsys):
    (tmp_path / "log.txt").mkdir()  # a folder in the way: the log file cannot be opened
    console.setup(str(tmp_path))
    console.set_process_index(0)
    console.start_log_file()
    absl_logging.info("one")
    absl_logging.info("two")
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("dpwave: cannot write the log file") == 1
