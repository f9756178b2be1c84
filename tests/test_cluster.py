"""Submitting to a real Ray cluster (a head node started with `ray start`): the CLI returns at once,
a detached runner drives the job, `--wait` follows it, and `dsq cancel` reaches it."""

import os
import shutil
import sqlite3
import subprocess
import sys
import time
from contextlib import closing

import pytest

from dsq.db import repo
from dsq.db.session import open_database, session_scope
from tests.conftest import NARROW

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


@pytest.fixture(scope="module")
def trained(cluster, tmp_path_factory):
    """A home whose job 1, a digits classifier, was trained on the cluster by `dsq submit train --wait`."""
    home = tmp_path_factory.mktemp("cluster-home")
    out = dsq(home, cluster, "submit", "train", "--dataset", "digits", "--target", "classifier",
              *NARROW, "--objective", "standard", "--sigma", "0", "--epochs", "1", "--wait")
    assert out.returncode == 0, out.stderr
    assert "job 1 succeeded" in out.stdout
    return home


@pytest.fixture
def home(trained, tmp_path):
    """A copy of the trained home for one test: its database (copied by SQLite, as the cluster's worker for the
    original may still be writing its heartbeat; without that worker's row, which would make the copy look served)
    and its artifacts (a copied home keeps its artifacts)."""
    home = tmp_path / "home"
    shutil.copytree(trained, home, ignore=shutil.ignore_patterns("dsq.db*", "workers"))
    with closing(sqlite3.connect(trained / "dsq.db")) as source, closing(sqlite3.connect(home / "dsq.db")) as copy:
        source.backup(copy)
        with copy:  # the original's worker serves the original database: this copy starts a worker of its own
            copy.execute("DELETE FROM workers")
    return home


def test_submit_returns_at_once_and_a_detached_runner_finishes_the_job(cluster, home):
    started = time.monotonic()
    out = dsq(home, cluster, "submit", "certify", "--dataset", "digits", "--classifier", "job:1",
              "--sigma", "0.25", "--n0", "20", "--n", "4000", "--batch-size", "100", "--max-images", "30",
              "--workers", "2")
    assert out.returncode == 0 and out.stdout.strip() == "job 2", out.stderr
    assert wait_status(home, 2, ("running", "succeeded"))[0] in ("running", "succeeded")
    submitted_in = time.monotonic() - started
    status, done = wait_status(home, 2, ("succeeded", "failed"))
    assert status == "succeeded" and done == 30
    assert time.monotonic() - started > submitted_in  # the CLI had returned before the job ended


def test_cancel_reaches_a_job_running_on_the_cluster(cluster, home):
    out = dsq(home, cluster, "submit", "certify", "--dataset", "digits", "--classifier", "job:1",
              "--sigma", "0.5", "--n", "20000", "--batch-size", "200", "--workers", "1")
    assert out.returncode == 0
    wait_status(home, 2, ("running",))
    assert dsq(home, cluster, "cancel", "2").returncode == 0
    status, done = wait_status(home, 2, ("cancelled", "failed", "succeeded"), timeout=120)
    assert status == "cancelled" and done < 364
    out = dsq(home, cluster, "cancel", "2")
    assert out.returncode == 2 and "already cancelled" in out.stderr
