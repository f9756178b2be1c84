"""Retries that end, and a status that says why: each run of a job is an attempt; an unexpected error is retried
after a backoff and a dead worker costs an attempt, until the job gives up; a clean hand-back costs nothing; a
waiting job says what it waits for; a reached API budget is a state of its own."""

import os
import signal
import time
from datetime import timedelta
from types import SimpleNamespace

import pytest

from typer.testing import CliRunner

from cli.main import app
from dsq import experiments, jobqueue, jobs, views
from dsq.db import repo
from dsq.db.models import ApiAnswer, utcnow
from dsq.db.session import open_database, session_scope
from dsq.errors import InvalidArgument
from dsq.kinds.train import TrainSpec

STALE = timedelta(seconds=60)
TRAIN = TrainSpec(dataset="digits", target="classifier", arch="small_cnn", objective="standard", sigma=0.0).to_dict()


def add(engine, after=(), max_attempts=3, spec=None, kind="train") -> int:
    with session_scope(engine) as session:
        job = repo.create_job(session, kind=kind, spec=spec or TRAIN, seed=0, max_attempts=max_attempts)
        jobqueue.add_dependencies(session, job.id, after)
        return job.id


def take(engine, job_id, worker, now=None) -> bool:
    with session_scope(engine) as session:
        return jobqueue.take(session, job_id, worker, now=now) is not None


def job(engine, job_id):
    with session_scope(engine) as session:
        found = repo.get_job(session, job_id)
        session.expunge(found)
        return found


def state(engine, job_id, now=None, workers=None) -> str:
    with session_scope(engine) as session:
        alive = jobqueue.live_workers(session, STALE) if workers is None else workers
        return views.state(session, repo.get_job(session, job_id), now or utcnow(), STALE, alive)


def runs(engine, job_id) -> list[str]:
    with session_scope(engine) as session:
        return views.attempt_lines(session, repo.get_job(session, job_id))


def test_backoff_doubles_with_each_attempt_and_its_jitter_stays_within_half_of_it():
    assert [jobqueue.backoff(used, draw=lambda: 1.0) for used in (1, 2, 3)] == [10.0, 20.0, 40.0]
    assert [jobqueue.backoff(used, draw=lambda: 0.0) for used in (1, 2, 3)] == [5.0, 10.0, 20.0]
    assert jobqueue.backoff(30, draw=lambda: 1.0) == jobqueue.BACKOFF_CAP_SECONDS
    assert len({jobqueue.backoff(1) for _ in range(20)}) > 1  # jitter: workers do not come back in step


def test_an_error_is_retried_after_its_backoff_then_the_job_gives_up_and_fails_its_dependents(engine):
    job_id = add(engine)
    child = add(engine, after=[job_id])
    now = utcnow()
    for attempt in (1, 2):
        assert take(engine, job_id, f"w{attempt}", now=now)
        with session_scope(engine) as session:
            assert jobs.fail_or_retry(session, job_id, f"w{attempt}", f"RuntimeError: boom {attempt}",
                                      now=now) == "queued"
            waits = (repo.get_job(session, job_id).not_before - now).total_seconds()
            assert jobqueue.claim(session, "other", now=now) is None  # not before its backoff
        assert 5 * 2 ** (attempt - 1) <= waits <= 10 * 2 ** (attempt - 1)
        said = state(engine, job_id, now=now, workers=[])
        assert said == f"retrying in {round(waits)} s (attempt {attempt + 1} of 3)" or \
            said == f"retrying in {round(waits) + 1} s (attempt {attempt + 1} of 3)", said
        now += timedelta(seconds=waits + 0.001)
    assert take(engine, job_id, "w3", now=now)
    with session_scope(engine) as session:
        assert jobs.fail_or_retry(session, job_id, "w3", "RuntimeError: boom 3", "Traceback ...", now=now) == "failed"
    ended = job(engine, job_id)
    assert ended.error == "gave up after 3 attempts: it failed each time (last: RuntimeError: boom 3)"
    assert ended.traceback == "Traceback ..."
    assert job(engine, child).error == f"dependency job {job_id} failed: {ended.error}"
    assert runs(engine, job_id) == [
        line for line in runs(engine, job_id) if line.startswith("attempt ")]
    assert [line.split(" UTC: ")[1] for line in runs(engine, job_id)] == [
        "error: RuntimeError: boom 1", "error: RuntimeError: boom 2", "error: RuntimeError: boom 3"]
    assert [line.split(",")[0] for line in runs(engine, job_id)] == [
        "attempt 1 of 3 on w1", "attempt 2 of 3 on w2", "attempt 3 of 3 on w3"]


def test_an_error_from_a_run_whose_job_was_taken_over_changes_nothing_of_the_new_run(engine):
    """A runner that was presumed dead (its job taken over) and then raises must not end the new runner's attempt,
    queue the job again under it, or fail it: the job is no longer its own."""
    job_id = add(engine, max_attempts=2)
    assert take(engine, job_id, "old", now=utcnow() - 2 * STALE)
    with session_scope(engine) as session:
        assert jobqueue.requeue_stale(session, STALE) == ([job_id], [])
    assert take(engine, job_id, "new")
    with session_scope(engine) as session:
        assert jobs.fail_or_retry(session, job_id, "old", "RuntimeError: late") == "running"
    taken = job(engine, job_id)
    assert (taken.status, taken.runner, taken.error) == ("running", "new", None)
    last = runs(engine, job_id)[-1]
    assert last.startswith("attempt 2 of 2 on new") and "error" not in last, last


def test_a_job_whose_worker_dies_each_time_ends_failed_after_max_attempts_and_never_loops(engine):
    job_id = add(engine)
    child = add(engine, after=[job_id])
    assert take(engine, job_id, "w1")
    with session_scope(engine) as session:
        assert jobqueue.retire_worker(session, "w1", why="pid 11 is gone") == ([job_id], [], [])
    assert take(engine, job_id, "w2", now=utcnow() - 2 * STALE)  # its heartbeat goes stale
    with session_scope(engine) as session:
        assert jobqueue.requeue_stale(session, STALE) == ([job_id], [])
    assert take(engine, job_id, "w3")
    with session_scope(engine) as session:
        assert jobqueue.requeue_runner(session, "w3") == ([], [job_id])  # an actor restarted: out of attempts
        assert jobqueue.claim(session, "w4") is None
    ended = job(engine, job_id)
    assert ended.status == "failed"
    assert ended.error == ("gave up after 3 attempts: the worker died each time "
                           "(last: worker w3 died: its process died (restarted))")
    assert job(engine, child).status == "failed" and ended.error in job(engine, child).error
    lines = runs(engine, job_id)
    assert "on w1" in lines[0] and lines[0].endswith("died: worker w1 died: pid 11 is gone")
    assert lines[1].endswith("died: worker w2 died: no heartbeat for 60 s")


def test_a_clean_hand_back_is_not_an_attempt_and_a_resume_gives_the_attempts_afresh(engine):
    job_id = add(engine, max_attempts=2)
    for _ in range(4):  # SIGTERM, SIGINT, a database that came back: handed back each time
        assert take(engine, job_id, "w")
        with session_scope(engine) as session:
            assert jobqueue.release(session, job_id, "w")
    assert take(engine, job_id, "w")
    with session_scope(engine) as session:
        assert jobqueue.retire_worker(session, "w") == ([job_id], [], [])  # the first counted attempt
    assert take(engine, job_id, "w")
    with session_scope(engine) as session:
        assert jobqueue.retire_worker(session, "w") == ([], [job_id], [])
    assert job(engine, job_id).error.startswith("gave up after 2 attempts: the worker died each time")
    assert [line.split(",")[0] for line in runs(engine, job_id)] == ["attempt 1 of 2 on w"] * 5 + [
        "attempt 2 of 2 on w"]
    assert sum(line.endswith("UTC: handed back") for line in runs(engine, job_id)) == 4
    with session_scope(engine) as session:
        jobs.resume(session, job_id, STALE)
    assert take(engine, job_id, "w")
    with session_scope(engine) as session:
        assert jobqueue.retire_worker(session, "w") == ([job_id], [], [])  # two attempts again
    assert "(before a resume)" in runs(engine, job_id)[-2] and "attempt 1 of 2" in runs(engine, job_id)[-1]
    assert take(engine, job_id, "silent")
    with session_scope(engine) as session:  # its worker went silent; resumed by hand once stale
        jobs.resume(session, job_id, STALE, now=utcnow() + 2 * STALE)
    assert runs(engine, job_id)[-1].endswith("died (before a resume): worker silent went silent; resumed by hand")


def test_the_runner_retries_an_unexpected_error_and_ends_a_users_mistake_or_a_budget_at_once(settings, monkeypatch,
                                                                                           opens_database):
    from dsq.errors import BudgetReached, TrainingDiverged
    from workers import runner
    from workers.loop import Control

    engine = open_database(settings.database_url)
    raised = {}

    def loop(engine, settings, job_id, spec, control):
        raise raised[job_id]

    monkeypatch.setattr(runner, "LOOPS", {"train": loop, "certify_api": loop})
    crash, mistake = add(engine), add(engine)
    budget = add(engine, kind="certify_api", spec={"provider": "aws", "max_queries": 3})
    raised.update({crash: MemoryError("CUDA out of memory"), mistake: TrainingDiverged("the loss became NaN"),
                   budget: BudgetReached("query budget reached: 3 of 3 queries paid")})
    assert runner.run_job(settings, crash, Control(runner="w"), spec=SimpleNamespace(kind="train")) == "queued"
    assert job(engine, crash).not_before > utcnow() and runs(engine, crash)[0].endswith(
        "error: MemoryError: CUDA out of memory")
    stopping = Control(runner="w")
    stopping.stop.set()  # SIGTERM: the worker stops, and the job's actors went with it
    assert runner.run_job(settings, crash, stopping, spec=SimpleNamespace(kind="train")) == "queued"
    assert runs(engine, crash)[-1].endswith("handed back") and job(engine, crash).not_before is None
    with session_scope(engine) as session:
        assert jobqueue.used_attempts(session, crash) == 1  # the crash only
    assert runner.run_job(settings, mistake, Control(runner="w"), spec=SimpleNamespace(kind="train")) == "failed"
    assert job(engine, mistake).error == "the loss became NaN"  # bad input or a user's error: not retried
    assert runner.run_job(settings, budget, Control(runner="w"), spec=SimpleNamespace(kind="certify_api")) == "budget"
    assert job(engine, budget).traceback is None
    engine.dispose()


def test_a_runnable_job_says_what_it_waits_for(engine):
    job_id = add(engine)
    assert state(engine, job_id) == "queued, position 1; no worker serves this database (start one: dsq worker)"
    with session_scope(engine) as session:
        jobqueue.register_worker(session, name="gpu", host="h", pid=1, address=None, max_jobs=0,
                                 resources={"CPU": 8.0, "GPU": 1.0})
        jobqueue.worker_heartbeat(session, "gpu", free={"CPU": 7.0, "GPU": 0.0})  # its GPU is taken
    assert state(engine, job_id) == "waiting for a GPU (needs 1; the cluster has 0 free)"
    with session_scope(engine) as session:
        jobqueue.worker_heartbeat(session, "gpu", free={"CPU": 8.0, "GPU": 1.0})
    assert state(engine, job_id) == "queued, position 1"
    with session_scope(engine) as session:
        jobqueue.register_worker(session, name="gpu", host="h", pid=1, address=None, max_jobs=0,
                                 resources={"CPU": 2.0})
        jobqueue.worker_heartbeat(session, "gpu", free={"CPU": 0.0})  # a CPU cluster, busy
    assert state(engine, job_id) == "waiting for a CPU (needs 1; the cluster has 0 free)"


def test_a_worker_records_what_its_cluster_offers_and_what_its_jobs_leave_free(settings):
    from workers.worker import QueueWorker, Running

    worker = QueueWorker(settings, max_request={"GPU": 2.0})  # an autoscaler may add up to 2 GPUs
    assert worker._offers({"CPU": 4.0, "memory": 1e9}) == {"CPU": 4.0, "GPU": 2.0}
    worker.running[1] = Running(1, "train", {"GPU": 1.0}, control=None, spec=None)
    worker.running[2] = Running(2, "certify", {"CPU": 3.0}, control=None, spec=None)
    assert worker._free({"CPU": 4.0, "GPU": 1.0}) == {"CPU": 1.0, "GPU": 0.0}


def test_a_reached_budget_is_its_own_state_ends_dependents_and_resumes_only_with_a_larger_one(engine):
    api = add(engine, kind="certify_api", spec={"provider": "aws", "max_queries": 3})
    child = add(engine, after=[api])
    assert take(engine, api, "w")
    with session_scope(engine) as session:
        for digest in "abc":
            session.add(ApiAnswer(provider="aws", service="vendor", sha256=digest * 64, answer={}, top_label="x",
                                  job_id=api))
        jobs.finish(session, api, "budget", error="query budget reached: 3 of 3 queries paid")
        assert jobqueue.blocked_queued(session) == {}
    assert job(engine, api).status == "budget" and job(engine, api).finished
    assert job(engine, child).error == (f"dependency job {api} stopped at its query budget: "
                                        "query budget reached: 3 of 3 queries paid")
    assert runs(engine, api)[0].endswith("budget: query budget reached: 3 of 3 queries paid")
    with session_scope(engine) as session, pytest.raises(InvalidArgument, match="--max-queries M with M > 3"):
        jobs.resume(session, api, STALE)
    with session_scope(engine) as session, pytest.raises(
            InvalidArgument, match=f"--after {api}: job {api} stopped at its query budget: query budget reached"):
        jobs.submit(session, TrainSpec(**TRAIN), None, after=[api])
    with session_scope(engine) as session:
        repo.set_spec(session, api, {"provider": "aws", "max_queries": 10})
        assert jobs.resume(session, api, STALE) == [child]


def test_max_attempts_must_be_a_positive_integer_in_files_and_on_submit(tmp_path, engine):
    plan = tmp_path / "plan.toml"
    body = ('name = "x"\ndataset = "digits"\nsigmas = [0.25]\n{extra}\n'
            '[[methods]]\nlabel = "m"\nclassifier = "c.pt"\n')
    plan.write_text(body.format(extra="max_attempts = 5"))
    assert experiments.load(plan).max_attempts == 5
    assert experiments.load(plan, overrides=("max_attempts=2",)).max_attempts == 2
    for bad in ("0", "2.5", '"3"'):
        plan.write_text(body.format(extra=f"max_attempts = {bad}"))
        with pytest.raises(InvalidArgument, match="max_attempts must be an integer >= 1"):
            experiments.load(plan)
    with session_scope(engine) as session, pytest.raises(InvalidArgument, match="max attempts must be"):
        jobs.submit(session, TrainSpec(**{**TRAIN}), None, max_attempts=0)


def test_max_attempts_on_every_submit_command_is_one_line_and_exit_2(tmp_path):
    home = {"DSQ_HOME": str(tmp_path), "RAY_ADDRESS": "", "DSQ_WORKER_AUTOSTART": "0"}
    commands = (["train", "--dataset", "digits", "--target", "classifier", "--objective", "standard", "--sigma", "0"],
                ["certify", "--dataset", "digits", "--classifier", "f.pt", "--sigma", "0.25"],
                ["predict", "--dataset", "digits", "--classifier", "f.pt", "--sigma", "0.25"],
                ["certify-api", "--provider", "aws", "--sigma", "0.25", "--input", "a.png"],
                ["experiment", "experiments/digits.toml"])
    for command in commands:
        for bad in ("0", "x", "1.5"):
            out = CliRunner().invoke(app, ["submit", *command, "--max-attempts", bad], env=home)
            lines = out.stderr.strip().splitlines()
            assert out.exit_code == 2 and len(lines) == 1, (command, bad, out.stderr)
            assert lines[0].startswith("error: --max-attempts must be an integer >= 1, got "), lines
    assert not (tmp_path / "dsq.db").exists()  # refused before anything was written


def test_show_and_logs_list_each_attempt_and_resuming_a_budget_job_says_what_it_needs(sqlite_url):
    """In-process CLI (its engines stay open): on SQLite only; the queue functions run on both dialects above."""
    db_url, engine = sqlite_url, open_database(sqlite_url)
    job_id = add(engine)
    assert take(engine, job_id, "first")
    with session_scope(engine) as session:
        jobqueue.retire_worker(session, "first", why="pid 7 is gone")
    assert take(engine, job_id, "second")
    with session_scope(engine) as session:
        jobs.fail_or_retry(session, job_id, "second", "MemoryError: out of memory")
    shown = CliRunner().invoke(app, ["--db", db_url, "show", str(job_id)])
    assert shown.exit_code == 0, shown.output
    assert f"job {job_id}: train, retrying in " in shown.stdout and "(attempt 3 of 3)" in shown.stdout
    logs = CliRunner().invoke(app, ["--db", db_url, "logs", str(job_id)]).stdout
    for out in (shown.stdout, logs):
        assert "attempt 1 of 3 on first, " in out and "UTC: died: worker first died: pid 7 is gone" in out
        assert "attempt 2 of 3 on second, " in out and "UTC: error: MemoryError: out of memory" in out
    assert "attempt 2 of 3 failed: MemoryError: out of memory; retrying in " in logs

    api = add(engine, kind="certify_api", spec={"provider": "aws", "max_queries": 1})
    assert take(engine, api, "w")
    with session_scope(engine) as session:
        session.add(ApiAnswer(provider="aws", service="vendor", sha256="a" * 64, answer={}, top_label="x", job_id=api))
        jobs.finish(session, api, "budget", error="query budget reached")
    out = CliRunner().invoke(app, ["--db", db_url, "resume", str(api)], env={"DSQ_WORKER_AUTOSTART": "0"})
    assert out.exit_code == 2 and out.stderr.strip().splitlines() == [
        f"error: job {api} stopped at its query budget (1 of 1 queries paid): resume it with a larger one, "
        f"dsq resume {api} --max-queries M with M > 1"]
    assert job(engine, api).status == "budget"
    engine.dispose()


def test_a_job_whose_worker_is_killed_each_time_ends_failed_with_why(tmp_path, joins_local_ray):
    """A poison job: every worker that runs it dies (kill -9). After its max attempts the next worker ends it failed,
    with the reason, and `dsq show` and `dsq logs` list each attempt with its worker and what ended it."""
    from tests.test_worker import dsq, engine_of, start

    home = tmp_path / "home"
    home.mkdir()
    engine = engine_of(home)
    spec = TrainSpec(dataset="digits", target="classifier", arch="small_cnn", objective="standard", sigma=0.0,
                     epochs=500)
    job_id = add(engine, max_attempts=2, spec=spec.to_dict())
    killed = []
    try:
        for _ in range(2):
            worker = start(home, "worker")
            deadline = time.monotonic() + 300
            while not ((run := job(engine, job_id)).status == "running" and f"-{worker.pid}-" in (run.runner or "")):
                assert worker.poll() is None and time.monotonic() < deadline, worker.communicate()
                time.sleep(0.2)
            os.kill(worker.pid, signal.SIGKILL)
            worker.wait(timeout=60)
            killed.append(job(engine, job_id).runner)
        out = dsq(home, "worker", "--drain", timeout=600)
        assert out.returncode == 0 and "ran 0 job(s)" in out.stdout, out.stdout + out.stderr
        ended = job(engine, job_id)
        assert ended.status == "failed", ended.error
        assert ended.error == (f"gave up after 2 attempts: the worker died each time (last: worker {killed[1]} died: "
                               f"pid {killed[1].split('-')[-2]} is gone)")
        shown = dsq(home, "show", job_id).stdout
        assert f"job {job_id}: train, failed" in shown
        for number, name in enumerate(killed, 1):
            assert f"attempt {number} of 2 on {name}, " in shown and f"died: worker {name} died: pid " in shown, shown
    finally:
        engine.dispose()
