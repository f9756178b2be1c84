"""A background worker stopped with `kill PID` (SIGTERM) leaves no pid file behind, and its log lines carry the time."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from dsq import jobqueue
from dsq.db.session import open_database, session_scope
from dsq.settings import Settings
from workers import background, pidfile

pytestmark = pytest.mark.e2e  # a real background worker, stopped by a signal
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d) ")


def wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.5)


@pytest.fixture(scope="module")
def stopped_worker(tmp_path_factory):
    """A background worker started as `dsq submit` starts one, then sent SIGTERM: (pid file, worker.log)."""
    home = tmp_path_factory.mktemp("worker-home")
    settings = Settings(database_url=f"sqlite:///{home / 'dsq.db'}", home=home, idle_seconds=300)
    engine = open_database(settings.database_url)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DSQ_HOME", str(home))  # the worker inherits the submitting command's environment
        patch.delenv("RAY_ADDRESS", raising=False)
        assert "started a background worker" in background.ensure_worker(settings, engine)
    pid_file = pidfile.path(settings)
    pid = int(pid_file.read_text())
    try:
        def registered():
            with session_scope(engine) as session:
                return bool(jobqueue.live_workers(session, settings.stale_after))

        wait_for(registered, 180, "the background worker never registered")
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: _reaped(pid), 120, "the worker did not stop on SIGTERM")
        yield pid_file, (home / "worker.log").read_text()
    finally:
        if not _reaped(pid):  # the test failed before the worker stopped
            os.kill(pid, signal.SIGKILL)
        engine.dispose()


def _reaped(pid: int) -> bool:
    """Reap our exited child (the worker is this process's child); True once it has exited."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done == pid


def test_sigterm_removes_the_workers_pid_file(stopped_worker):
    pid_file, log = stopped_worker
    assert "stopped (SIGTERM)" in log, log
    assert not pid_file.exists()


def test_the_workers_log_lines_carry_a_timestamp(stopped_worker):
    _, log = stopped_worker
    ours = [line for line in log.splitlines() if re.search(r"worker \S+(: serving| stopped \()", line)]
    assert len(ours) == 2 and all(STAMP.match(line) for line in ours), log
