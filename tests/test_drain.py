"""Draining ends, and leaves nothing behind: resume re-queues only dependents that can still run, a queued job that
can never run is named instead of waited for, and the jobs of a killed local worker go back to the queue at once."""

import os
import socket
import subprocess
import sys
from datetime import timedelta

import pytest
from sqlalchemy import update

from dsq import jobqueue, jobs
from dsq.db import repo
from dsq.db.models import Job, utcnow
from dsq.db.session import session_scope
from workers import pidfile

STALE = timedelta(seconds=60)


def add(engine, after=()) -> int:
    with session_scope(engine) as session:
        job = repo.create_job(session, kind="train", spec={"target": "classifier"}, seed=0)
        jobqueue.add_dependencies(session, job.id, after)
        return job.id


def job(engine, job_id) -> Job:
    with session_scope(engine) as session:
        found = repo.get_job(session, job_id)
        session.expunge(found)
        return found


def cancel(engine, job_id):
    with session_scope(engine) as session:
        jobs.cancel(session, job_id, STALE)


def resume(engine, job_id) -> list[int]:
    with session_scope(engine) as session:
        return jobs.resume(session, job_id, STALE)


def blocked(engine) -> dict:
    with session_scope(engine) as session:
        return jobqueue.blocked_queued(session)


def test_resuming_one_of_two_ended_dependencies_leaves_the_dependent_failed_blocked_by_the_other(engine):
    a, b = add(engine), add(engine)
    c = add(engine, after=[a, b])
    grandchild = add(engine, after=[c])
    cancel(engine, a)
    cancel(engine, b)
    assert (job(engine, c).status, job(engine, c).blocked_by) == ("failed", a)
    assert resume(engine, a) == []  # c also waits for b, which stays cancelled
    assert job(engine, a).status == "queued"
    for dependent in (c, grandchild):
        ended = job(engine, dependent)
        assert (ended.status, ended.blocked_by, ended.error) == ("failed", b, f"dependency job {b} was cancelled")
    assert blocked(engine) == {}  # nothing queued waits for an ended job
    with session_scope(engine) as session:
        assert "still not run: dependency job" in repo.logs_for_job(session, c)[-1].message
    assert resume(engine, b) == [c, grandchild]  # now every dependency of c can succeed
    assert [job(engine, j).status for j in (a, b, c, grandchild)] == ["queued"] * 4
    assert job(engine, c).blocked_by is None and job(engine, c).error is None


def test_the_cause_that_stays_is_the_root_a_later_resume_brings_everything_back(engine):
    root = add(engine)
    b = add(engine, after=[root])  # b fails with root
    a = add(engine)
    c = add(engine, after=[a, b])
    with session_scope(engine) as session:
        assert jobqueue.claim(session, "w").id == root
        jobs.finish(session, root, "failed", error="boom")
    assert [job(engine, j).blocked_by for j in (b, c)] == [root, root]
    assert job(engine, a).status == "queued"  # unrelated to root
    cancel(engine, a)  # c already failed: it keeps root as its cause
    assert resume(engine, root) == [b]  # c waits for a (cancelled) too
    ended = job(engine, c)
    assert (ended.status, ended.blocked_by, ended.error) == ("failed", a, f"dependency job {a} was cancelled")
    assert resume(engine, a) == [c]


def test_a_dependent_stays_failed_while_its_other_dependency_failed_through_another_job(engine):
    first, second = add(engine), add(engine)
    middle = add(engine, after=[second])
    last = add(engine, after=[first, middle])
    cancel(engine, first)  # last fails, blocked by first
    with session_scope(engine) as session:
        assert jobqueue.claim(session, "w").id == second
        jobs.finish(session, second, "failed", error="out of memory")  # middle fails; last had already
    assert resume(engine, first) == []
    ended = job(engine, last)
    assert ended.blocked_by == second and ended.error == f"dependency job {second} failed: out of memory"
    assert resume(engine, second) == [middle, last]


def test_queued_jobs_that_wait_for_an_ended_job_are_named_as_never_running(engine):
    a, b = add(engine), add(engine)
    c = add(engine, after=[a, b])
    d = add(engine, after=[c])
    free = add(engine, after=[a])
    cancel(engine, b)
    with session_scope(engine) as session:  # another path left c and d queued (what resume did before)
        session.execute(update(Job).where(Job.id.in_([c, d])).values(status="queued", error=None, blocked_by=None))
    assert blocked(engine) == {c: (b, b, "cancelled"), d: (c, b, "cancelled")}
    assert job(engine, free).status == "queued" and free not in blocked(engine)
    with session_scope(engine) as session:
        session.execute(update(Job).where(Job.id == free).values(cancel_requested=True))
    assert blocked(engine)[free] == (free, free, "cancel requested")
    from workers.worker import _blocked_line
    assert _blocked_line(c, b, b, "cancelled").startswith(f"job {c} waits for job {b} (cancelled): nothing can run it")
    assert f"(through job {c})" in _blocked_line(d, c, b, "cancelled")


def test_a_dead_workers_jobs_go_back_to_the_queue_and_its_cancelled_ones_end(engine):
    kept, cancelled, other = add(engine), add(engine), add(engine)
    waiting = add(engine, after=[cancelled])
    with session_scope(engine) as session:
        jobqueue.register_worker(session, name="dead", host="here", pid=12345, address=None, max_jobs=0)
        jobqueue.register_worker(session, name="alive", host="here", pid=1, address=None, max_jobs=0)
        jobqueue.register_worker(session, name="far", host="there", pid=12345, address=None, max_jobs=0)
        assert [jobqueue.take(session, j, "dead").id for j in (kept, cancelled)] == [kept, cancelled]
        assert jobqueue.take(session, other, "alive").id == other
        repo.request_cancel(session, cancelled)
        assert [w.name for w in jobqueue.workers_on(session, "here")] == ["dead", "alive"]
    with session_scope(engine) as session:
        assert jobqueue.retire_worker(session, "dead") == ([kept], [], [cancelled])
    with session_scope(engine) as session:
        assert jobqueue.retire_worker(session, "dead") == ([], [], [])  # a second worker seeing it changes nothing
        assert [w.name for w in jobqueue.workers_on(session, "here")] == ["alive"]
        assert [w.name for w in jobqueue.live_workers(session, STALE)] == ["alive", "far"]
    assert [job(engine, j).status for j in (kept, cancelled, other, waiting)] == \
        ["queued", "cancelled", "running", "failed"]
    with session_scope(engine) as session:
        assert jobqueue.claim(session, "next").id == kept
        assert jobqueue.steering(session, kept, "dead") == (False, False)  # the dead runner cannot write on


def test_stale_jobs_whose_cancel_was_requested_end_cancelled_and_quiet_ones_are_seen(engine):
    running, quiet, mine = add(engine), add(engine), add(engine)
    with session_scope(engine) as session:
        for job_id in (running, quiet):
            jobqueue.take(session, job_id, "gone")
        jobqueue.take(session, mine, "me", now=utcnow() - timedelta(minutes=5))
        repo.request_cancel(session, running)
        repo.heartbeat(session, running, now=utcnow() - timedelta(minutes=5))
        repo.heartbeat(session, quiet, now=utcnow() - timedelta(seconds=30))
        assert [j.id for j in jobqueue.quiet_running(session, timedelta(seconds=15), besides="me")] == [running, quiet]
        assert jobqueue.requeue_stale(session, STALE) == ([mine], [])  # not the one whose cancel was requested
        assert jobqueue.cancel_stale(session, STALE) == [running]
        assert jobqueue.cancel_stale(session, STALE) == []
    assert job(engine, running).status == "cancelled"


def test_a_process_is_gone_when_its_pid_is_free_or_reused_and_never_when_it_runs():
    now = utcnow()
    assert not pidfile.gone(os.getpid(), now)  # this process, which registered after it started
    assert not pidfile.gone(os.getppid(), now)
    assert pidfile.gone(os.getpid(), now - timedelta(days=400))  # the pid now belongs to a younger process
    free = next(pid for pid in range(4_000_000, 3_000_000, -1) if not os.path.exists(f"/proc/{pid}"))
    assert pidfile.gone(free, now)
    assert not pidfile.gone(0, now) and not pidfile.gone(-1, now)


@pytest.mark.e2e  # a child process, killed
def test_a_killed_child_is_gone_once_dead_even_before_it_is_reaped():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        assert not pidfile.gone(child.pid, utcnow())
        child.kill()
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # dead, not reaped: a zombie
        assert pidfile.gone(child.pid, utcnow())
        child.wait(timeout=60)
        assert pidfile.gone(child.pid, utcnow())
    finally:
        child.kill()
        child.wait()


def test_workers_placed_on_a_ray_are_listed_and_one_registered_again_is_not_retired(engine):
    first = add(engine)
    with session_scope(engine) as session:
        jobqueue.register_worker(session, name="node", host="a", pid=1, address=None, max_jobs=0, node_id="ab" * 28)
        jobqueue.register_worker(session, name="actor", host="b", pid=2, address=None, max_jobs=0,
                                 node_id="cd" * 28, actor_id="ef" * 16)
        jobqueue.register_worker(session, name="plain", host="c", pid=3, address=None, max_jobs=0)
        assert [(w.name, w.node_id, w.actor_id) for w in jobqueue.ray_workers(session)] == \
            [("node", "ab" * 28, None), ("actor", "cd" * 28, "ef" * 16)]
        seen = jobqueue.ray_workers(session)[1].started_at
        assert jobqueue.take(session, first, "actor").id == first
    with session_scope(engine) as session:  # Ray restarted the actor elsewhere: it registered again, keeps its job
        jobqueue.register_worker(session, name="actor", host="b", pid=4, address=None, max_jobs=0,
                                 node_id="12" * 28, actor_id="ef" * 16, now=seen + timedelta(seconds=1))
    with session_scope(engine) as session:
        assert jobqueue.retire_worker(session, "actor", why="its node is dead", started_at=seen) == ([], [], [])
        assert job(engine, first).status == "running"
        again = jobqueue.ray_workers(session)[1].started_at
        assert jobqueue.retire_worker(session, "actor", why="its node is dead", started_at=again) == ([first], [], [])
        assert [w.name for w in jobqueue.ray_workers(session)] == ["node"]


@pytest.mark.unit
def test_a_worker_is_dead_on_ray_when_its_node_is_or_its_quiet_actor_is(monkeypatch):
    import ray
    from ray._private.state import state
    from types import SimpleNamespace
    from workers import worker

    now, quiet = utcnow(), utcnow() - timedelta(seconds=60)
    rows = [SimpleNamespace(name="on-dead-node", node_id="aa", actor_id=None, heartbeat_at=now),
            SimpleNamespace(name="on-live-node", node_id="bb", actor_id=None, heartbeat_at=quiet),
            SimpleNamespace(name="other-cluster", node_id="cc", actor_id=None, heartbeat_at=quiet),
            SimpleNamespace(name="dead-actor", node_id="bb", actor_id="11", heartbeat_at=quiet),
            SimpleNamespace(name="dead-actor-beating", node_id="bb", actor_id="11", heartbeat_at=now),
            SimpleNamespace(name="restarting-actor", node_id="bb", actor_id="22", heartbeat_at=quiet)]
    asked = []
    monkeypatch.setattr(ray, "nodes", lambda: [{"NodeID": "aa", "Alive": False}, {"NodeID": "bb", "Alive": True}])
    monkeypatch.setattr(state, "actor_table",
                        lambda actor_id: asked.append(actor_id) or {"State": {"11": "DEAD"}.get(actor_id, "RESTARTING")})
    found = [(w.name, why) for w, why in worker.dead_on_ray(rows)]
    assert found == [("on-dead-node", "its Ray node aa is dead"), ("dead-actor", "its Ray actor 11 is dead")]
    assert asked == ["11", "22"]  # the actor table is read only for quiet workers' actors
    assert worker.dead_on_ray([]) == []
    monkeypatch.setattr(ray, "nodes", lambda: 1 / 0)  # a GCS that does not answer: nobody is judged
    assert worker.dead_on_ray(rows) == []


def test_only_workers_on_this_host_are_looked_at(engine):
    with session_scope(engine) as session:
        jobqueue.register_worker(session, name="w", host=socket.gethostname(), pid=os.getpid(), address=None,
                                 max_jobs=0)
        jobqueue.register_worker(session, name="x", host="elsewhere", pid=os.getpid(), address=None, max_jobs=0)
        assert [w.name for w in jobqueue.workers_on(session, socket.gethostname())] == ["w"]


@pytest.mark.e2e  # dsq commands and a draining worker, in processes
def test_resume_of_one_cancelled_dependency_then_drain_ends_and_names_what_cannot_run(tmp_path, joins_local_ray):
    """`dsq cancel A`, `dsq cancel B`, `dsq resume A`: C (after A and B) stays failed, blocked by B, and
    `dsq worker --drain` runs A and exits, even when something left C queued: it names what C waits for."""
    from tests.conftest import NARROW
    from tests.test_worker import dsq, engine_of

    train = ["--dataset", "digits", "--target", "classifier", *NARROW, "--objective", "standard", "--sigma", "0",
             "--epochs", "1"]
    home = tmp_path / "home"
    quiet = {"DSQ_WORKER_AUTOSTART": "0"}
    ids = []
    for _ in range(3):
        after = [f"--after={j}" for j in ids] if len(ids) == 2 else []  # the third after the first two
        out = dsq(home, "submit", "train", *train, *after, **quiet)
        assert out.returncode == 0, out.stderr
        ids.append(int(out.stdout.split()[-1]))
    a, b, c = ids
    for command in (("cancel", a), ("cancel", b), ("resume", a)):
        out = dsq(home, *command, **quiet)
        assert out.returncode == 0, out.stderr
    engine = engine_of(home)
    try:
        ended = job(engine, c)
        assert (ended.status, ended.blocked_by, ended.error) == ("failed", b, f"dependency job {b} was cancelled")
        with session_scope(engine) as session:  # as resume used to leave it: queued behind a cancelled job
            session.execute(update(Job).where(Job.id == c).values(status="queued", error=None, blocked_by=None))
        out = dsq(home, "worker", "--drain", timeout=900)
        assert out.returncode == 0 and "ran 1 job(s)" in out.stdout, out.stdout + out.stderr
        assert f"job {c} waits for job {b} (cancelled): nothing can run it" in out.stdout, out.stdout
        assert [job(engine, j).status for j in (a, b, c)] == ["succeeded", "cancelled", "queued"]
    finally:
        engine.dispose()


def test_submit_starts_a_worker_when_the_only_live_looking_one_here_was_killed(tmp_path, engine, db_url, monkeypatch):
    """A worker killed a moment ago still has a fresh heartbeat: `dsq submit` does not count it as serving."""
    from dsq.settings import Settings
    from workers import background

    settings = Settings(database_url=db_url, home=tmp_path)
    spawned = []
    monkeypatch.setattr(background, "_spawn", lambda settings, pid_file: spawned.append(pid_file) or "started")
    free = next(pid for pid in range(4_000_000, 3_000_000, -1) if not os.path.exists(f"/proc/{pid}"))
    with session_scope(engine) as session:
        jobqueue.register_worker(session, name="killed", host=socket.gethostname(), pid=free, address=None,
                                 max_jobs=0)
        jobqueue.register_worker(session, name="far", host="elsewhere", pid=free, address="10.0.0.1:6379",
                                 max_jobs=0)
    assert background.ensure_worker(settings, engine) == "started" and len(spawned) == 1
    with session_scope(engine) as session:
        jobqueue.register_worker(session, name="alive", host=socket.gethostname(), pid=os.getpid(), address=None,
                                 max_jobs=0)
    assert background.ensure_worker(settings, engine) is None and len(spawned) == 1
