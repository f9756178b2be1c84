"""What following a job shows: a certification's images, this run's img/s, certified so far and ETA."""

import re
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import common
from cli.main import app
from dsq import views
from dsq.kinds.train import TrainSpec
from dsq.db import repo
from dsq.db.models import utcnow
from dsq.db.session import open_database, session_scope
from dsq.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
SEQUENTIAL = {"mode": "sequential", "target_radius": 0.5, "max_n": 1000}


def store(session, job_id, index, *, prediction=1, label=1, radius=0.4, correct=None, extra=None):
    correct = prediction == label if correct is None else correct
    repo.upsert_result(session, job_id, index, label=label, prediction=prediction, radius=radius, correct=correct,
                       p_lower=0.9, counts_selection=[0, 10], counts_estimation=[0, 100], n0=10, n=100,
                       alpha=0.001, sigma=0.25, seconds=0.1, extra=extra)


def certify_job(session, total=30, **spec):
    return repo.create_job(session, kind="certify", spec={"sigma": 0.25, **spec}, seed=0, total=total).id


def line_at(session, job_id, now):
    return views.progress_line(session, repo.get_job(session, job_id), now)


def test_a_running_certification_shows_this_runs_rate_certified_and_eta(engine):
    started = utcnow() - timedelta(seconds=60)
    with session_scope(engine) as session:
        job_id = certify_job(session)
        repo.mark_running(session, job_id, "w", now=started)
        for i in range(7):  # correct and certified
            store(session, job_id, i)
        store(session, job_id, 7, radius=0.0)  # correct, radius 0: not certified
        store(session, job_id, 8, prediction=-1, radius=0.0, correct=False)  # abstain
        store(session, job_id, 9, prediction=-1, radius=0.0, correct=True)  # abstain, whatever is stored
        store(session, job_id, 10, prediction=2, correct=False)  # wrong, with a radius
        store(session, job_id, 11, prediction=3, correct=False)
        repo.set_progress(session, job_id, 12)
        assert repo.count_results(session, job_id, since=started) == (12, 7, 12)
        line = line_at(session, job_id, started + timedelta(seconds=10))
    assert line == "12/30 images · 1.2 img/s · certified 58% · ETA 15 s"


def test_the_rate_counts_only_images_of_this_run(engine):
    with session_scope(engine) as session:
        job_id = certify_job(session)
        repo.mark_running(session, job_id, "w", now=utcnow() - timedelta(seconds=60))
        for i in range(4):
            store(session, job_id, i, prediction=2 if i else 1)  # 1 of 4 certified
        repo.mark_finished(session, job_id, "failed", "killed")
        repo.mark_queued(session, job_id)
        assert line_at(session, job_id, utcnow()) == "0/30 images · certified 25%"  # queued again: no rate
    time.sleep(0.01)
    restarted = utcnow()
    with session_scope(engine) as session:
        repo.mark_running(session, job_id, "w", now=restarted)
        store(session, job_id, 4)
        store(session, job_id, 5)
        repo.set_progress(session, job_id, 6)
        assert repo.count_results(session, job_id, since=restarted) == (6, 3, 2)
        line = line_at(session, job_id, restarted + timedelta(seconds=4))
    assert line == "6/30 images · 0.5 img/s · certified 50% · ETA 48 s"


def test_a_sequential_job_counts_certified_at_its_target(engine):
    started = utcnow() - timedelta(seconds=60)
    with session_scope(engine) as session:
        job_id = certify_job(session, total=5, radius=0.5, max_n=1000)
        repo.mark_running(session, job_id, "w", now=started)
        store(session, job_id, 0, radius=0.5, extra=SEQUENTIAL)  # certified exactly at the target
        store(session, job_id, 1, radius=0.8, extra=SEQUENTIAL)
        store(session, job_id, 2, radius=0.3)  # a radius below the target does not count
        store(session, job_id, 3, prediction=2, radius=0.7, correct=False, extra=SEQUENTIAL)
        store(session, job_id, 4, prediction=-1, radius=0.0, correct=False, extra=SEQUENTIAL)
        repo.set_progress(session, job_id, 5)
        repo.mark_finished(session, job_id, "succeeded", now=started + timedelta(seconds=5))
        line = line_at(session, job_id, utcnow())  # a finished job: the rate of its run, no ETA
    assert line == "5/5 images · 1.0 img/s · certified 40% at r = 0.5"


def test_queued_stale_and_training_jobs(engine):
    with session_scope(engine) as session:
        queued = certify_job(session)
        assert line_at(session, queued, utcnow()) == "0/30 images"
        stale = certify_job(session)
        repo.mark_running(session, stale, "w", now=utcnow() - timedelta(seconds=600))
        store(session, stale, 0)
        store(session, stale, 1, prediction=-1, radius=0.0, correct=False)
        repo.set_progress(session, stale, 2)
        lines = views.describe(session, repo.get_job(session, stale), utcnow(), timedelta(seconds=60))
        assert lines[0].startswith(f"job {stale} (certify): stale") and lines[3] == "2/30 images · certified 50%"
        train = repo.create_job(session, kind="train", spec={}, seed=0, total=4).id
        repo.mark_running(session, train, "w", now=utcnow() - timedelta(seconds=10))
        repo.set_progress(session, train, 2)
        record = repo.get_job(session, train)
        assert views.progress_line(session, record, utcnow()) is None
        lines = views.describe(session, record, utcnow(), timedelta(seconds=60))
    assert lines[3] == "epoch 2 of 4 done · 5 s an epoch · ETA 10 s" and len(lines) == 4


def test_follow_shows_the_line_for_a_certification_and_epochs_for_a_training(engine, capsys, monkeypatch):
    monkeypatch.setenv("DSQ_PROGRESS", "1")
    started = utcnow() - timedelta(seconds=60)
    with session_scope(engine) as session:
        job_id = certify_job(session, total=2)
        repo.mark_running(session, job_id, "w", now=started)
        store(session, job_id, 0)
        store(session, job_id, 1, prediction=2, correct=False)
        repo.set_progress(session, job_id, 2)
        repo.mark_finished(session, job_id, "succeeded", now=started + timedelta(seconds=4))
        train = repo.create_job(session, kind="train", spec={}, seed=0, total=3).id
        repo.mark_running(session, train, "w")
        repo.set_progress(session, train, 3)
        repo.mark_finished(session, train, "succeeded")
    assert common.follow(engine, job_id, f"job {job_id}") == "succeeded"
    shown = capsys.readouterr().err
    assert f"job {job_id} (succeeded)" in shown and "2/2 images · 0.5 img/s · certified 50%" in shown
    assert common.follow(engine, train, f"job {train}") == "succeeded"
    shown = capsys.readouterr().err
    assert "3/3" in shown and "images" not in shown


FOLLOW_WITHOUT_HEAVY_IMPORTS = """
import sys
from typer.testing import CliRunner
from cli import common
from cli.main import app
from dsq.db.session import open_database
from dsq.kinds.train import TrainSpec

url = sys.argv[1]
out = CliRunner().invoke(app, ["--db", url, "status", "1", "--follow"])
assert out.exit_code == 0 and "1/1 images" in out.output, out.output
assert common.follow(open_database(url), 1, "job 1") == "succeeded"
heavy = sorted({"torch", "ray", "numpy", "scipy"} & set(sys.modules))
assert not heavy, heavy
"""


@pytest.mark.e2e
def test_following_imports_neither_torch_nor_ray(sqlite_url):
    engine = open_database(sqlite_url)
    with session_scope(engine) as session:
        job_id = certify_job(session, total=1)
        repo.mark_running(session, job_id, "w")
        store(session, job_id, 0)
        repo.set_progress(session, job_id, 1)
        repo.mark_finished(session, job_id, "succeeded")
    engine.dispose()
    done = subprocess.run([sys.executable, "-c", FOLLOW_WITHOUT_HEAVY_IMPORTS, sqlite_url], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# -- end to end: `dsq submit certify --wait` and `dsq status --follow` on a real certification ---------------------


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, ray_session):
    """A database whose job 1 is a digits classifier trained for one epoch."""
    from tests.test_jobs import run

    home = tmp_path_factory.mktemp("progress-home")
    config = Settings(database_url=f"sqlite:///{home / 'dsq.db'}", home=home)
    engine = open_database(config.database_url)
    run(config, engine, TrainSpec(dataset="digits", target="classifier", arch="small_cnn",
                                        objective="standard", sigma=0.0, epochs=1, batch_size=64, name="f"))
    yield config, engine
    engine.dispose()


def run_when_queued(config, engine, outcome):
    """Play the worker: run the first certify job once `dsq submit` has queued it."""
    from workers import runner

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with session_scope(engine) as session:
            queued = repo.list_jobs(session, kind="certify", status="queued")
        if queued:
            outcome["status"] = runner.run_job(config, queued[0].id)
            return
        time.sleep(0.1)


def test_submit_wait_and_status_follow_show_images_rate_and_certified(classifier):
    config, engine = classifier
    outcome = {}
    worker = threading.Thread(target=run_when_queued, args=(config, engine, outcome))
    worker.start()
    cli = CliRunner()
    env = {"DSQ_HOME": str(config.home), "RAY_ADDRESS": "", "DSQ_WORKER_AUTOSTART": "0", "DSQ_PROGRESS": "1"}
    db = ["--db", config.database_url]
    out = cli.invoke(app, [*db, "submit", "certify", "--dataset", "digits", "--classifier", "job:1",
                           "--sigma", "0.25", "--n0", "20", "--n", "200", "--batch-size", "100",
                           "--max-images", "6", "--wait"], env=env)
    worker.join(timeout=120)
    assert out.exit_code == 0 and outcome == {"status": "succeeded"}, out.output
    job_id = int(re.search(r"^job (\d+)$", out.stdout, re.M).group(1))
    with session_scope(engine) as session:
        rows = repo.results_for_job(session, job_id)
    certified = sum(1 for r in rows if r.correct and r.prediction != -1 and r.radius > 0)
    expected = rf"6/6 images · [0-9.]+ img/s · certified {100 * certified / len(rows):.0f}%"
    assert re.search(expected, out.stderr) and "ETA" not in out.stderr, out.stderr
    shown = cli.invoke(app, [*db, "status", str(job_id), "--follow"], env=env)
    assert shown.exit_code == 0 and re.search(rf"^{expected}$", shown.output, re.M), shown.output
