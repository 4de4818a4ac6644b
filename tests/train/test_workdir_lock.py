"""One run per workdir (`dpwave.train.workdir_lock`): a second process is refused with one line naming the holder,
a killed holder's lock is taken over, object stores and lock-less file systems warn and go on."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from helpers import runs

from dpwave.train import workdir_lock
from dpwave.train.workdir_lock import WorkdirLockedError

# Holds a workdir's lock the way a run does (an exclusive flock and its holder line), then sleeps until killed.
_HOLDER = """
import fcntl, json, os, sys, time
fd = os.open(os.path.join(sys.argv[1], ".lock"), os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"host": "node7", "pid": os.getpid(), "started": "2026-01-02T03:04:05+00:00",
                         "command": "requeued job"}).encode())
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture
def other_holder(tmp_path):
    """A process that holds `tmp_path`'s lock (stdlib only: starts in well under a second)."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.unit
def test_a_held_workdir_is_refused_naming_the_holder_and_a_killed_holders_lock_is_taken_over(tmp_path, other_holder):
    with pytest.raises(WorkdirLockedError) as refused, workdir_lock.hold(str(tmp_path)):
        pass
    message = str(refused.value)
    assert "\n" not in message
    assert f"pid {other_holder.pid} on node7, started 2026-01-02T03:04:05+00:00 (requeued job)" in message
    assert "wait for it to end, or stop it, then rerun the same command" in message
    other_holder.send_signal(signal.SIGKILL)
    other_holder.wait()
    with workdir_lock.hold(str(tmp_path)):  # the kernel dropped the dead holder's lock
        me = json.loads((tmp_path / ".lock").read_text())
        assert (me["pid"], me["host"]) == (os.getpid(), socket.gethostname())
    assert (tmp_path / ".lock").read_text() == ""  # released: nobody to name


@pytest.mark.unit
def test_a_second_hold_in_the_same_process_is_refused_too(tmp_path):
    refused = pytest.raises(WorkdirLockedError, match=f"pid {os.getpid()} on ")
    with workdir_lock.hold(str(tmp_path)), refused, workdir_lock.hold(str(tmp_path)):
        pass
    with workdir_lock.hold(str(tmp_path)):
        pass


@pytest.mark.unit
def test_object_stores_and_file_systems_without_locks_warn_and_go_on(tmp_path, monkeypatch, caplog):
    with caplog.at_level(logging.WARNING), workdir_lock.hold("gs://bucket/run"):
        pass
    assert "on an object store, which dpwave cannot lock" in caplog.text

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING), workdir_lock.hold(str(tmp_path)):
        pass
    assert "this file system has no file locks" in caplog.text


@pytest.mark.integration
def test_a_second_run_on_a_running_workdir_is_refused_in_one_line(compile_cache, tmp_path):
    """Two real `python -m dpwave.main` on one workdir: the second stops at once, naming the first; the first is
    not disturbed; once the first is killed, its lock is free."""
    workdir = tmp_path / "run"
    args = runs.cli_args(workdir, {"tokenizer.steps": 10_000})  # the first run is still training when it is killed
    first = subprocess.Popen(args, cwd=runs.REPO, env=runs.subprocess_env(compile_cache), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (workdir / "versions.json").exists():  # written once the run holds the workdir
            assert first.poll() is None and time.monotonic() < deadline, "the first run never started"
            time.sleep(0.1)
        holder = json.loads((workdir / ".lock").read_text())
        assert holder["pid"] == first.pid
        written = {name: (workdir / name).read_bytes() for name in (".lock", "config.json", "versions.json")}
        log = workdir / "log.txt"
        log_size = log.stat().st_size if log.exists() else 0  # the first run keeps writing its log: it may only grow
        code, stderr = runs.run_cli({"second": args[3:]}, compile_cache)["second"]
        lines = runs.message_lines(stderr)
        assert code == 1 and len(lines) == 1, stderr[-3000:]
        assert lines[0] == (f"dpwave.main: workdir {workdir} is in use by another run: pid {first.pid} on "
                            f"{holder['host']}, started {holder['started']} ({holder['command']}); one run per "
                            "workdir: wait for it to end, or stop it, then rerun the same command (it resumes), or "
                            "use another --workdir")
        assert first.poll() is None
        # The second run wrote nothing in the workdir, not even its own lines of log.txt.
        assert {name: (workdir / name).read_bytes() for name in written} == written
        assert "is in use by another run" not in log.read_text()[log_size:]
    finally:
        first.kill()
        first.wait()
    with workdir_lock.hold(str(workdir)):
        pass


@pytest.mark.unit
@pytest.mark.parametrize("index", [0, 1])
def test_multi_host_process_0_locks_for_every_process(tmp_path, monkeypatch, other_holder, index):
    """Process 0 tries the lock and broadcasts whether the workdir is busy; every process stops when it is."""
    told = []
    monkeypatch.setattr(workdir_lock.jax, "process_count", lambda: 2)
    monkeypatch.setattr(workdir_lock.jax, "process_index", lambda: index)
    monkeypatch.setattr(workdir_lock.multihost_utils, "broadcast_one_to_all",
                        lambda busy: told.append(int(busy)) or 1)  # process 0 found it busy
    with pytest.raises(WorkdirLockedError, match="in use by another run") as refused, \
            workdir_lock.hold(str(tmp_path)):
        pass
    assert told == [index == 0]  # only process 0's answer counts; process 1 sends a placeholder
    assert (f"pid {other_holder.pid}" in str(refused.value)) == (index == 0)
