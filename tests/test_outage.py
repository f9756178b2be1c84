"""A PostgreSQL server that goes away mid-job: the worker rides out a restart, or stops in one line and a later
worker takes the job over once the server is back. Nothing stored is lost, redone or duplicated."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from dsq.db import repo
from dsq.db.session import open_database, session_scope
from tests.conftest import PgServer, slow

pytestmark = pytest.mark.e2e
DSQ = [sys.executable, "-m", "cli"]
# 40 images of the sleeping classifier (tests/slownet.py): 7 batches of 0.03 s each, seconds of wall-clock time and
# little CPU, so that an outage lands mid-job.
CERTIFY = ["submit", "certify", "--dataset", "digits", *slow(0.03), "--sigma", "0.25", "--n0", "20",
           "--n", "3000", "--batch-size", "500", "--max-images", "40", "--workers", "1"]
NOISE = ("Traceback", "*** SIG", "core dumped")


@pytest.fixture
def server():
    if os.environ.get("DSQ_TEST_POSTGRES_URL"):
        pytest.fail("this test stops its own server: unset DSQ_TEST_POSTGRES_URL")
    found = PgServer()
    try:
        yield found
    finally:
        found.remove()


def env_for(tmp_path, server, **extra):
    return os.environ | {"DSQ_HOME": str(tmp_path), "DSQ_DATABASE_URL": f"{server.url}/postgres", "RAY_ADDRESS": "",
                         "DSQ_WORKER_AUTOSTART": "0", **extra}


def dsq(env, *args, timeout=900):  # deadlines against hangs, generous for a busy machine
    return subprocess.run(DSQ + [str(a) for a in args], env=env, capture_output=True, text=True, timeout=timeout)


def results(url, job_id):
    engine = open_database(url)
    try:
        with session_scope(engine) as session:
            return {r.image_index: r.id for r in repo.results_for_job(session, job_id)}, repo.get_job(session, job_id)
    finally:
        engine.dispose()


def wait_until(condition, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError("timed out")


def prepared(tmp_path, server, **extra):
    env = env_for(tmp_path, server, **extra)
    assert dsq(env, *CERTIFY).returncode == 0
    worker = subprocess.Popen(DSQ + ["worker"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    url = env["DSQ_DATABASE_URL"]
    wait_until(lambda: len(results(url, 1)[0]) >= 3)
    return env, url, worker


def finish(worker):
    try:
        return worker.communicate(timeout=300)
    finally:
        try:
            os.killpg(worker.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def reconnects_while_down(server, attempts=5, timeout=180):
    """While the server is down, take its port and turn away whoever tries to connect: return once that happened
    ``attempts`` times (the worker or its job is riding out the outage), so the outage lasts until it is noticed."""
    with socket.create_server(("127.0.0.1", server.port)) as listener:
        listener.settimeout(1)
        deadline = time.monotonic() + timeout
        while attempts:
            assert time.monotonic() < deadline, f"nobody tried to reach the database within {timeout} s"
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            connection.close()
            attempts -= 1


def test_a_restart_costs_the_worker_a_pause_and_an_outage_past_its_grace_stops_it_until_a_later_one_resumes(
        tmp_path, server, joins_local_ray):
    """One worker and two outages of its PostgreSQL server. A restart within the grace period costs job 1 a pause,
    not the job. An outage longer than the grace stops the worker in one line, with the next job left running; once
    the server is back, a drain takes that job over and resumes it. Nothing stored is lost, redone or duplicated."""
    env, url, worker = prepared(tmp_path, server, DSQ_DB_GRACE_SECONDS="15", DSQ_WORKER_IDLE_SECONDS="600")
    try:
        assert results(url, 1)[1].status == "running"
        server.stop()  # mid-job
        reconnects_while_down(server, attempts=3)  # well within the grace: the worker waits
        server.start()
        wait_until(lambda: results(url, 1)[1].status in ("succeeded", "failed"), timeout=600)
        stored, job = results(url, 1)
        assert job.status == "succeeded" and len(stored) == 40 and job.attempts == 1, job.error
        assert worker.poll() is None, finish(worker)

        submitted = dsq(env, *CERTIFY, "--seed", "3")
        assert submitted.returncode == 0, submitted.stderr
        second = int(submitted.stdout.split()[-1])  # 2, or more: a restarted server may skip sequence values
        wait_until(lambda: len(results(url, second)[0]) >= 3)
        before, _ = results(url, second)
        server.stop()  # for good, as far as the worker can tell
    except BaseException:
        os.killpg(worker.pid, signal.SIGKILL)
        raise
    out, err = finish(worker)
    assert worker.returncode == 1 and not any(noise in out + err for noise in NOISE), out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"database unreachable for 15 s; jobs left running: {second}" in lines[0], err
    server.start()
    stored, job = results(url, second)
    assert job.status == "running" and set(before) <= set(stored)
    drained = dsq(env, "worker", "--drain")
    assert drained.returncode == 0 and "queued again" in drained.stdout, drained.stdout + drained.stderr
    after, job = results(url, second)
    assert job.status == "succeeded" and len(after) == 40 and job.attempts == 2
    assert {i: after[i] for i in stored} == stored  # what was stored before the outage was kept, not redone


def test_a_worker_started_before_its_database_waits_for_it_and_a_refused_login_is_one_line_at_once(
        tmp_path, server, joins_local_ray):
    """A cluster's workers may come up before its PostgreSQL server: `dsq worker` asks again for the grace period,
    saying so in one line, and serves once the server answers. A server that answers and refuses is not waited for."""
    env = env_for(tmp_path, server, DSQ_DB_GRACE_SECONDS="600")
    assert dsq(env, "submit", "certify", "--dataset", "digits", *slow(0), "--sigma", "0.25", "--n0", "10",
               "--n", "100", "--max-images", "1").returncode == 0
    server.stop()
    worker = subprocess.Popen(DSQ + ["worker", "--drain"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        reconnects_while_down(server, attempts=3)  # it keeps asking
        assert worker.poll() is None
        server.start()
    finally:
        out, err = finish(worker)
    assert worker.returncode == 0 and "ran 1 job(s)" in out and not any(n in out + err for n in NOISE), out + err
    [line] = err.strip().splitlines()
    assert "cannot reach database" in line and "asking again for up to 600 s" in line, err

    refused = dsq(env | {"DSQ_DATABASE_URL": f"{server.url}/no_such_database"}, "worker", "--drain", timeout=300)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert 'database "no_such_database" does not exist' in refused.stderr and "asking again" not in refused.stderr

    server.stop()  # a stop signal while it waits ends it at once, in one line
    waiting = subprocess.Popen(DSQ + ["worker"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        reconnects_while_down(server, attempts=2)
        waiting.send_signal(signal.SIGTERM)
    finally:
        out, err = finish(waiting)
    assert waiting.returncode == 128 + signal.SIGTERM and "stopped (SIGTERM) before serving" in out + err, out + err
    assert not any(n in out + err for n in NOISE), out + err
