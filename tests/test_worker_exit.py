"""A background worker stopped with `kill PID` (SIGTERM) leaves no pid file behind, exits 143, and its log lines carry
the time; `--follow` stopped by a signal says so in one line and exits 128 + N."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from dsq import jobqueue
from dsq.db import repo
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


EXITS: dict[int, int] = {}  # pid -> exit status of the children reaped here


@pytest.fixture(scope="module")
def stopped_worker(tmp_path_factory):
    """A background worker started as `dsq submit` starts one, then sent SIGTERM: (pid file, worker.log, exit code)."""
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
        yield pid_file, (home / "worker.log").read_text(), EXITS[pid]
    finally:
        if not _reaped(pid):  # the test failed before the worker stopped
            os.kill(pid, signal.SIGKILL)
        engine.dispose()


def _reaped(pid: int) -> bool:
    """Reap our exited child (the worker is this process's child); True once it has exited."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    if done == pid:
        EXITS[pid] = os.waitstatus_to_exitcode(status)
    return done == pid


def test_sigterm_removes_the_workers_pid_file_and_exits_143(stopped_worker):
    pid_file, log, code = stopped_worker
    assert "stopped (SIGTERM)" in log, log
    assert not pid_file.exists()
    assert code == 128 + signal.SIGTERM, log


def test_the_workers_log_lines_carry_a_timestamp(stopped_worker):
    _, log, _ = stopped_worker
    ours = [line for line in log.splitlines() if re.search(r"worker \S+(: serving| stopped \()", line)]
    assert len(ours) == 2 and all(STAMP.match(line) for line in ours), log


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("command", ["status", "logs"])
def test_follow_stopped_by_a_signal_says_so_and_exits_128_plus_n(tmp_path, command, how):
    engine = open_database(f"sqlite:///{tmp_path / 'dsq.db'}")
    with session_scope(engine) as session:
        repo.create_job(session, kind="train", spec={"sigma": 0.0}, seed=0, total=1)
        repo.add_log(session, 1, "submitted")
    engine.dispose()
    env = os.environ | {"DSQ_HOME": str(tmp_path), "RAY_ADDRESS": "", "DSQ_DATABASE_URL": "",
                        "DSQ_WORKER_AUTOSTART": "0"}
    following = subprocess.Popen([sys.executable, "-m", "cli", command, "1", "--follow"], env=env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        assert following.stdout.readline()  # it has printed, so it follows
        following.send_signal(how)
        stdout, stderr = following.communicate(timeout=60)
    finally:
        if following.poll() is None:
            following.kill()
    assert following.returncode == 128 + how, stderr
    assert stderr == f"{how.name}: stopped following job 1; it goes on (dsq status 1)\n"


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGINT])
def test_a_benchmark_stopped_by_a_signal_says_so_in_one_line_and_leaves_no_process(tmp_path, how):
    """`dsq bench --queue` drains jobs on a local Ray it started: a signal ends it with one line and 128 + N, without
    Ray's stack dump, and the Ray processes it started end with it."""
    err = tmp_path / "stderr"
    with open(err, "w") as sink:
        bench = subprocess.Popen([sys.executable, "-m", "cli", "bench", "--queue", "60"], cwd=tmp_path,
                                 env=os.environ | {"RAY_ADDRESS": "", "DSQ_LOCAL_RAY_ADDRESS": ""},
                                 stdout=subprocess.PIPE, stderr=sink, text=True, start_new_session=True)
    try:
        wait_for(lambda: "queue bench: 60 jobs" in err.read_text(), 300, "the benchmark never started draining")
        bench.send_signal(how)
        out, _ = bench.communicate(timeout=120)
        wait_for(lambda: not _group_alive(bench.pid), 60, "processes of the benchmark outlived it")
    finally:
        if _group_alive(bench.pid):
            os.killpg(bench.pid, signal.SIGKILL)
        bench.wait()
    said = err.read_text()
    assert bench.returncode == 128 + how, said
    assert said.splitlines()[-1] == f"benchmark stopped ({how.name})", said
    assert not any(noise in said + out for noise in ("Traceback", "*** SIG", "Aborted", "core dumped")), said


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
        return True
    except ProcessLookupError:
        return False


@pytest.mark.parametrize("command", ["status", "logs", "wait"])
def test_a_signal_that_lands_inside_a_database_commit_still_stops_following_in_one_line(tmp_path, capsys, command):
    """The signal arrives while `--follow` (or `--wait`) is inside a commit, as on a slow machine: it takes effect at
    the next pause, not in SQLAlchemy's middle (which ended in an AssertionError and exit 1)."""
    import typer
    from typer.testing import CliRunner

    from cli.main import app

    url = f"sqlite:///{tmp_path / 'dsq.db'}"
    engine = open_database(url)
    with session_scope(engine) as session:
        repo.create_job(session, kind="train", spec={"sigma": 0.0}, seed=0, total=1)
        repo.add_log(session, 1, "submitted")
    engine.dispose()
    sent = []

    def signal_within_the_commit(frame, event, arg):  # a tracer: where CI's slow machine delivered SIGTERM
        if event == "call" and frame.f_code.co_name == "_do_commit" and not sent:
            sent.append(frame.f_code.co_filename)
            os.kill(os.getpid(), signal.SIGTERM)  # its handler runs at the function's first line
        return None

    def follow() -> tuple[int, str]:
        if command == "wait":  # what `submit --wait` and `resume --wait` run
            from cli import common

            engine = open_database(url)
            with pytest.raises(typer.Exit) as stop:
                common.follow(engine, 1, "job 1")
            return stop.value.exit_code, capsys.readouterr().err
        out = CliRunner().invoke(app, ["--db", url, command, "1", "--follow"])
        assert not isinstance(out.exception, AssertionError), out.exception
        return out.exit_code, out.output

    sys.settrace(signal_within_the_commit)
    try:
        code, said = follow()
    finally:
        sys.settrace(None)
    assert sent, "no commit ran"
    assert code == 128 + signal.SIGTERM, said
    assert "SIGTERM: stopped following job 1; it goes on (dsq status 1)" in said
    assert "Traceback" not in said
