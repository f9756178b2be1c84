"""The queue in the database, on SQLite and PostgreSQL: order, dependencies, atomic claims, stale jobs, upgrades."""

import concurrent.futures
import multiprocessing
from datetime import timedelta

import pytest
from sqlalchemy import text

from dsq import jobqueue, jobs, views
from dsq.db import repo
from dsq.db.models import utcnow
from dsq.db.session import make_engine, open_database, session_scope, upgrade
from dsq.errors import JobStateError

STALE = timedelta(seconds=60)


def add(engine, priority=0, after=(), name=None, kind="train") -> int:
    with session_scope(engine) as session:
        job = repo.create_job(session, kind=kind, spec={"target": "classifier"}, seed=0, name=name,
                              priority=priority)
        jobqueue.add_dependencies(session, job.id, after)
        return job.id


def live(session, resources=None, free=None) -> list:
    """The live workers after registering one (offering ``resources``, of which ``free`` is left)."""
    jobqueue.register_worker(session, name="w", host="h", pid=1, address=None, max_jobs=0, resources=resources)
    if free is not None:
        jobqueue.worker_heartbeat(session, "w", free=free)
    return jobqueue.live_workers(session, STALE)


def claim(engine, worker="w") -> int | None:
    with session_scope(engine) as session:
        job = jobqueue.claim(session, worker)
        return job.id if job else None


def status(engine, job_id) -> str:
    with session_scope(engine) as session:
        return repo.get_job(session, job_id).status


def finish(engine, job_id, outcome="succeeded", error=None):
    with session_scope(engine) as session:
        jobs.finish(session, job_id, outcome, error=error)


def test_claims_follow_priority_then_age_and_wait_for_dependencies(engine):
    low, high, child, other_high = add(engine), add(engine, priority=5), None, add(engine, priority=5)
    child = add(engine, priority=9, after=[low])
    assert [claim(engine) for _ in range(3)] == [high, other_high, low]
    assert claim(engine) is None  # the child waits for `low`, which is running
    with session_scope(engine) as session:
        assert [d.id for d in jobqueue.unmet(session, child)] == [low]
        assert views.state(session, repo.get_job(session, child), utcnow(), STALE, live(session)) == \
            f"waiting for job {low} (running)"
    finish(engine, low)
    assert claim(engine) == child and claim(engine) is None
    with session_scope(engine) as session:
        assert all(repo.get_job(session, j).attempts == 1 for j in (low, high, child, other_high))


def test_position_counts_only_runnable_jobs_ahead(engine):
    first, blocked, second = add(engine), None, add(engine, priority=-1)
    blocked = add(engine, priority=3, after=[first])
    third = add(engine, priority=2)
    with session_scope(engine) as session:
        places = {j: jobqueue.position(session, repo.get_job(session, j)) for j in (first, blocked, second, third)}
        assert places == {third: 1, first: 2, second: 3, blocked: None}
        state = views.state(session, repo.get_job(session, third), utcnow(), STALE, [])
    assert state == "queued, position 1; no worker serves this database (start one: dsq worker)"


def test_a_failed_dependency_fails_its_dependents_transitively_and_resume_requeues_them(engine):
    root = add(engine)
    child = add(engine, after=[root])
    grandchild = add(engine, after=[child])
    unrelated = add(engine)
    assert claim(engine) == root
    finish(engine, root, "failed", error="boom")
    with session_scope(engine) as session:
        for job_id in (child, grandchild):
            job = repo.get_job(session, job_id)
            assert job.status == "failed" and job.error == f"dependency job {root} failed: boom"
            assert job.blocked_by == root
        assert repo.get_job(session, unrelated).status == "queued"
        with pytest.raises(JobStateError, match=f"resume job {root} first"):
            jobs.resume(session, grandchild, STALE)
    with session_scope(engine) as session:
        assert jobs.resume(session, root, STALE) == [child, grandchild]
    assert [status(engine, j) for j in (root, child, grandchild)] == ["queued"] * 3
    assert claim(engine) == root and claim(engine) == unrelated and claim(engine) is None
    finish(engine, root)
    assert claim(engine) == child


def test_cancel_ends_queued_waiting_and_stale_jobs_at_once(engine):
    running, waiting, queued = add(engine), None, add(engine)
    waiting = add(engine, after=[running])
    assert claim(engine) == running  # (queued is older than waiting, but running was claimed first)
    with session_scope(engine) as session:
        assert jobs.cancel(session, queued, STALE).status == "cancelled"
        assert jobs.cancel(session, running, STALE).status == "running"  # its runner stops it
        assert repo.is_cancel_requested(session, running)
    with session_scope(engine) as session:
        repo.heartbeat(session, running, now=utcnow() - timedelta(minutes=5))  # its worker died
        assert jobs.cancel(session, waiting, STALE).status == "cancelled"
    other = add(engine)
    assert claim(engine) == other
    with session_scope(engine) as session:
        repo.heartbeat(session, other, now=utcnow() - timedelta(minutes=5))
        assert jobs.cancel(session, other, STALE).status == "cancelled"  # stale: no runner will notice


def test_stale_jobs_go_back_to_the_queue_and_their_old_runner_cannot_write_on(engine):
    job_id = add(engine)
    assert claim(engine, "old") == job_id
    with session_scope(engine) as session:
        assert jobqueue.requeue_stale(session, STALE) == ([], [])
        repo.heartbeat(session, job_id, now=utcnow() - timedelta(minutes=2))
        assert jobqueue.requeue_stale(session, STALE) == ([job_id], [])
    assert claim(engine, "new") == job_id
    with session_scope(engine) as session:
        assert jobqueue.steering(session, job_id, "old") == (False, False)
        assert jobqueue.steering(session, job_id, "new") == (False, True)
        assert not jobqueue.release(session, job_id, "old")
        assert jobqueue.release(session, job_id, "new") and repo.get_job(session, job_id).status == "queued"
        assert repo.get_job(session, job_id).attempts == 2


def claim_all(url: str, worker: str, start=None) -> list[int]:
    """A worker process: claim and finish jobs until none is left (all together from ``start``, a barrier)."""
    engine = make_engine(url)
    taken = []
    if start is not None:  # process start-up takes seconds: without this the first one can take every job
        start.wait(timeout=120)
    try:
        while True:
            with session_scope(engine) as session:
                job = jobqueue.claim(session, worker)
                if job is None:
                    return taken
                taken.append(job.id)
            with session_scope(engine) as session:
                jobs.finish(session, job.id, "succeeded")
    finally:
        engine.dispose()


@pytest.mark.e2e  # four processes
def test_four_workers_racing_over_sixty_jobs_run_each_exactly_once(engine, db_url):
    ids = [add(engine, priority=i % 3) for i in range(60)]
    chained = add(engine, after=ids[:10])  # runs only after ten of them
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager, concurrent.futures.ProcessPoolExecutor(4, mp_context=context) as pool:
        start = manager.Barrier(4)
        taken = list(pool.map(claim_all, [db_url] * 4, [f"w{i}" for i in range(4)], [start] * 4))
    everything = [job_id for worker in taken for job_id in worker]
    assert sorted(everything) == sorted(everything) and len(everything) == len(set(everything))
    assert set(ids) <= set(everything)
    if chained not in everything:  # every worker left before the last of the ten finished: one more claim
        assert claim_all(db_url, "late") == [chained]
    with session_scope(engine) as session:
        assert all(repo.get_job(session, j).attempts == 1 and repo.get_job(session, j).status == "succeeded"
                   for j in ids + [chained])
    assert sum(1 for worker in taken if worker) >= 2  # the work was really shared


def test_workers_register_heartbeat_and_stop(engine):
    with session_scope(engine) as session:
        jobqueue.register_worker(session, name="a", host="h", pid=1, address=None, max_jobs=2)
        jobqueue.register_worker(session, name="b", host="h", pid=2, address=None, max_jobs=2,
                              now=utcnow() - timedelta(minutes=5))
        assert [w.name for w in jobqueue.live_workers(session, STALE)] == ["a"]
        jobqueue.worker_heartbeat(session, "b")
        jobqueue.stop_worker(session, "a")
        assert [w.name for w in jobqueue.live_workers(session, STALE)] == ["b"]


def test_a_database_at_0002_with_jobs_and_results_upgrades_without_loss(db_url):
    engine = make_engine(db_url)
    upgrade(engine, "0002")
    now = "2025-11-26 10:00:00+00:00"
    with engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO jobs (kind, name, spec, seed, status, cancel_requested, progress_done, progress_total,"
            " attempts, created_at) VALUES ('certify', 'old', '{\"sigma\": 0.25}', 7, 'succeeded', false, 2, 2, 1,"
            f" '{now}')"))
        connection.execute(text(
            "INSERT INTO results (job_id, image_index, label, prediction, radius, correct, p_lower,"
            " counts_selection, counts_estimation, n0, n, alpha, sigma, seconds, created_at) VALUES"
            f" (1, 0, 3, 3, 0.4123456789012345, true, 0.95, '[0, 1]', '[2, 8]', 1, 10, 0.001, 0.25, 0.5, '{now}')"))
    engine.dispose()
    engine = open_database(db_url)
    try:
        with session_scope(engine) as session:
            job = repo.get_job(session, 1)
            assert (job.name, job.status, job.priority, job.experiment, job.blocked_by) == ("old", "succeeded", 0,
                                                                                            None, None)
            [result] = repo.results_for_job(session, 1)
            assert result.radius == 0.4123456789012345 and result.counts_estimation == [2, 8]
            assert jobqueue.dependencies(session, 1) == [] and jobqueue.claim(session, "w") is None
    finally:
        engine.dispose()


def test_a_stale_job_says_what_to_do_when_no_worker_is_alive(engine):
    job_id = add(engine)
    assert claim(engine) == job_id
    with session_scope(engine) as session:
        repo.heartbeat(session, job_id, now=utcnow() - timedelta(minutes=5))
        job = repo.get_job(session, job_id)
        alone = views.state(session, job, utcnow(), STALE, [])
        served = views.state(session, job, utcnow(), STALE, live(session))
    assert "another worker" not in alone and f"start one (dsq worker) or dsq resume {job_id}" in alone
    assert "another worker takes it over" in served
