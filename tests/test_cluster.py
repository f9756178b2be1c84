"""Submitting to a real Ray cluster (a head node started with `ray start`): the CLI returns at once,
a detached runner drives the job, `--wait` follows it, and `dsq cancel` reaches it."""

import os
import subprocess
import sys
import time

import pytest

from dsq.db import repo
from dsq.db.session import open_database, session_scope
from tests.conftest import slow

DSQ = [sys.executable, "-m", "cli"]


@pytest.fixture(scope="module")
def cluster(local_ray):
    """A one-node Ray cluster on loopback: the session's `ray start`ed Ray (conftest's local_ray), here reached as a
    cluster (RAY_ADDRESS), so that submit starts a detached worker on it instead of a background process."""
    return local_ray


def dsq(home, address, *args, timeout=900):  # deadlines against hangs, generous for a busy machine
    env = os.environ | {"RAY_AUTH_MODE": "disabled", "DSQ_HOME": str(home), "RAY_ADDRESS": address}
    return subprocess.run(DSQ + [str(a) for a in args], env=env, capture_output=True, text=True, timeout=timeout)


def wait_status(home, job_id, wanted, timeout=300):
    engine = open_database(f"sqlite:///{home / 'dsq.db'}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope(engine) as session:
            job = repo.get_job(session, job_id)
            if job.status in wanted:
                return job.status, job.progress_done
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} not {wanted} within {timeout} s")


@pytest.fixture
def home(cluster, tmp_path):
    return tmp_path / "home"


def test_submit_returns_at_once_and_a_detached_runner_finishes_the_job_and_wait_follows_one(cluster, home, tmp_path):
    hold = tmp_path / "hold"  # the sleeping classifier's jobs wait on it (tests/slownet.py)
    hold.touch()
    out = dsq(home, cluster, "submit", "certify", "--dataset", "digits", *slow(hold=hold), "--sigma", "0.25",
              "--n0", "20", "--n", "4000", "--batch-size", "100", "--max-images", "30", "--workers", "2")
    assert out.returncode == 0 and out.stdout.strip() == "job 1", out.stderr
    assert wait_status(home, 1, ("running",)) == ("running", 0)  # the CLI returned; the job cannot have ended
    hold.unlink()
    status, done = wait_status(home, 1, ("succeeded", "failed"))
    assert status == "succeeded" and done == 30
    out = dsq(home, cluster, "submit", "certify", "--dataset", "digits", *slow(), "--sigma", "0.25", "--n0", "20",
              "--n", "1000", "--batch-size", "100", "--max-images", "2", "--wait")
    assert out.returncode == 0 and "job 2 succeeded" in out.stdout, out.stdout + out.stderr
    assert wait_status(home, 2, ("succeeded",)) == ("succeeded", 2)


def test_cancel_reaches_a_job_running_on_the_cluster(cluster, home, tmp_path):
    hold = tmp_path / "hold"  # the job waits on it until it is cancelled
    hold.touch()
    out = dsq(home, cluster, "submit", "certify", "--dataset", "digits", *slow(hold=hold), "--sigma", "0.5",
              "--n", "20000", "--batch-size", "200", "--workers", "1")
    assert out.returncode == 0, out.stderr
    wait_status(home, 1, ("running",))
    assert dsq(home, cluster, "cancel", "1").returncode == 0
    hold.unlink()
    status, done = wait_status(home, 1, ("cancelled", "failed", "succeeded"), timeout=120)
    assert status == "cancelled" and done < 364
    out = dsq(home, cluster, "cancel", "1")
    assert out.returncode == 2 and "already cancelled" in out.stderr
