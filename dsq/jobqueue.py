"""The task queue, in the database: dependencies, priorities, atomic claims, stale jobs, workers.

A job is *runnable* when it is queued and every job it depends on has succeeded. Workers take
runnable jobs highest ``priority`` first, then oldest first. A claim is one statement whose
effect decides who won, so two workers never run the same job:

- PostgreSQL: ``SELECT ... FOR UPDATE SKIP LOCKED`` picks a row no other transaction holds;
- SQLite: ``UPDATE jobs SET status = 'running' ... WHERE id = ? AND status = 'queued'``; the
  row count says whether this worker won (SQLite serialises writers).

A running job's runner writes a heartbeat; a job whose heartbeat is older than ``stale_after``
lost its worker (killed, machine gone) and goes back to the queue, where the next claim resumes
it from what the database holds. A failed or cancelled job fails its dependents, transitively,
with the reason; they remember it in ``blocked_by`` and are queued again when it is resumed, those whose
other dependencies can all still succeed: one that also waits for another failed or cancelled job stays failed,
blocked by that one. A queued job that waits (transitively) for a failed or cancelled job can never run
(``blocked_queued``): a draining worker names it and exits instead of waiting for it. A job stopped at its API
budget (``budget``) ends its dependents the same way.

Every run of a job is a row of ``job_attempts``. A run that ends in an unexpected error (``retry``) or whose worker
dies under it (stale heartbeat, pid gone, actor restarted) counts against the job's ``max_attempts``: the job is
queued again (after an error, not before its ``not_before``: exponential backoff with jitter) until it has used them
all, then it ends failed ("gave up after 3 attempts: ..."), so a job that kills its worker never loops. A run
handed back on a clean stop does not count.

Every function takes a Session first and never commits (the caller owns the transaction), and
nothing here imports torch or Ray.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from datetime import datetime, timedelta

from sqlalchemy import and_, exists, func, or_, select, update
from sqlalchemy.orm import Session, aliased

from dsq.db.models import ENDED_BADLY, Job, JobAttempt, JobDependency, Worker, utcnow
from dsq.db.repo import _REFRESH, _upsert, get_job

SQLITE_CANDIDATES = 16  # runnable ids tried per claim on SQLite before giving up (others won them)
COUNTED = ("error", "died")  # attempt outcomes that use up one of a job's max_attempts
BACKOFF_SECONDS = 10.0  # a job that raised waits about this long before its second attempt, twice that before its
BACKOFF_CAP_SECONDS = 600.0  # third, ... up to this; each wait is drawn in [1/2, 1] of it (jitter)


def _unmet():
    """SQL: the job has a dependency that has not succeeded."""
    dependency = aliased(Job)
    return exists(select(JobDependency.job_id).join(dependency, dependency.id == JobDependency.depends_on)
                  .where(JobDependency.job_id == Job.id, dependency.status != "succeeded"))


def _runnable(only: Iterable[int] | None = None, now: datetime | None = None):
    """SQL: runnable job ids in the order workers take them (``only``: among these jobs); a job waiting out its
    backoff (``not_before``) is not runnable yet."""
    stmt = select(Job.id).where(Job.status == "queued", Job.cancel_requested.is_(False), ~_unmet(),
                                or_(Job.not_before.is_(None), Job.not_before <= (now or utcnow())))
    if only is not None:
        stmt = stmt.where(Job.id.in_(sorted(only)))
    return stmt.order_by(Job.priority.desc(), Job.id)


# -- dependencies ------------------------------------------------------------------------


def add_dependencies(s: Session, job_id: int, depends_on: Iterable[int]) -> None:
    for other in sorted(set(depends_on)):
        s.add(JobDependency(job_id=job_id, depends_on=int(other)))
    s.flush()


def dependencies(s: Session, job_id: int) -> list[Job]:
    stmt = (select(Job).join(JobDependency, JobDependency.depends_on == Job.id)
            .where(JobDependency.job_id == job_id).order_by(Job.id))
    return list(s.scalars(stmt, execution_options=_REFRESH))


def dependents(s: Session, job_id: int) -> list[int]:
    return list(s.scalars(select(JobDependency.job_id).where(JobDependency.depends_on == job_id)
                          .order_by(JobDependency.job_id)))


def unmet(s: Session, job_id: int) -> list[Job]:
    """The dependencies of a job that have not succeeded (what it waits for)."""
    return [job for job in dependencies(s, job_id) if job.status != "succeeded"]


def fail_dependents(s: Session, job_id: int, reason: str, *, now: datetime | None = None) -> list[int]:
    """Fail every queued job that (transitively) depends on ``job_id``; return their ids."""
    now, failed, frontier = now or utcnow(), [], [job_id]
    while frontier:
        parent = frontier.pop()
        for child in dependents(s, parent):
            stmt = (update(Job).where(Job.id == child, Job.status == "queued")
                    .values(status="failed", error=f"dependency job {job_id} {reason}", blocked_by=job_id,
                            finished_at=now).returning(Job.id))
            if s.execute(stmt).first() is not None:
                failed.append(child)
                frontier.append(child)
    return failed


def requeue_blocked(s: Session, job_id: int) -> list[int]:
    """Queue again the jobs that failed because ``job_id`` did (it is being resumed, already queued).

    Only those whose every dependency can still succeed: one that also waits for another failed or cancelled
    job (or for a queued job that can never run) stays failed, now blocked by that job's root cause, with its
    reason; resuming that one queues it. Returns the queued ids.
    """
    blocked = set(s.scalars(select(Job.id).where(Job.blocked_by == job_id, Job.status == "failed")))
    if not blocked:
        return []
    dependency = aliased(Job)
    edges = s.execute(select(JobDependency.job_id, dependency.id, dependency.status, dependency.blocked_by,
                             dependency.error)
                      .join(dependency, dependency.id == JobDependency.depends_on)
                      .where(JobDependency.job_id.in_(sorted(blocked)))).all()
    doomed = blocked_queued(s)
    needs: dict[int, list] = {job: [] for job in blocked}
    for edge in edges:
        needs[edge[0]].append(edge)
    requeued: set[int] = set()
    changed = True
    while changed:  # a blocked job may wait for another one that comes back (transitive dependents)
        changed = False
        for job in sorted(blocked - requeued):
            if all(_can_succeed(edge, requeued, doomed) for edge in needs[job]):
                requeued.add(job)
                changed = True
    if requeued:
        s.execute(update(Job).where(Job.id.in_(sorted(requeued)), Job.status == "failed")
                  .values(status="queued", error=None, traceback=None, blocked_by=None, finished_at=None,
                          cancel_requested=False))
    causes: dict[int, tuple[int, str]] = {}

    def cause(job: int) -> tuple[int, str]:
        """The ended job that still keeps ``job`` from running (its root), and why."""
        if job not in causes:
            causes[job] = (job_id, _reason(s, job_id))  # (not reached: something keeps it from running)
            for _, dep, status, dep_blocked_by, _ in needs[job]:
                if dep in requeued:
                    continue
                if dep in blocked:
                    causes[job] = cause(dep)
                    break
                if dep in doomed:
                    root = doomed[dep][1]
                    causes[job] = (root, _reason(s, root))
                    break
                if status in ENDED_BADLY:
                    root = dep_blocked_by or dep
                    causes[job] = (root, _reason(s, root))
                    break
        return causes[job]

    for job in sorted(blocked - requeued):
        root, reason = cause(job)
        s.execute(update(Job).where(Job.id == job)
                  .values(blocked_by=root, error=f"dependency job {root} {reason}"))
    return sorted(requeued)


def blocked_jobs(s: Session, job_id: int) -> list[int]:
    """The failed jobs that ``job_id``'s failure or cancellation keeps from running (``blocked_by``)."""
    return list(s.scalars(select(Job.id).where(Job.blocked_by == job_id, Job.status == "failed").order_by(Job.id)))


def _can_succeed(edge, requeued: set[int], doomed: dict) -> bool:
    _, dep, status, _, _ = edge
    return dep in requeued or (status not in ENDED_BADLY and dep not in doomed)


def _reason(s: Session, job_id: int) -> str:
    """Why a failed or cancelled job ended, as its dependents say it ("was cancelled", "failed: ...")."""
    row = s.execute(select(Job.status, Job.error).where(Job.id == job_id)).first()
    return "is gone" if row is None else reason(row.status, row.error)


def reason(status: str, error: str | None) -> str:
    """How a job that ended badly is named by the jobs waiting for it."""
    if status == "cancelled":
        return "was cancelled"
    if status == "budget":
        return f"stopped at its query budget: {error}"
    return f"failed: {error}" if status == "failed" else f"is {status}"


def blocked_queued(s: Session) -> dict[int, tuple[int, int, str]]:
    """Queued jobs that can never run as things stand: job id -> (the dependency it waits for, the failed or
    cancelled job at the end of that chain, its status).

    A queued job with a failed or cancelled dependency is one, and so is a queued job that waits for one of
    them; a queued job whose cancel was requested runs no more either (its status there: "cancel requested").
    Only ``dsq resume`` (or ``dsq cancel``) changes them, so a draining worker does not wait for them.
    """
    child, dependency = aliased(Job), aliased(Job)
    edges = s.execute(select(JobDependency.job_id, JobDependency.depends_on, dependency.status,
                             dependency.cancel_requested)
                      .join(child, child.id == JobDependency.job_id)
                      .join(dependency, dependency.id == JobDependency.depends_on)
                      .where(child.status == "queued").order_by(JobDependency.job_id, JobDependency.depends_on)
                      ).all()
    doomed: dict[int, tuple[int, int, str]] = {
        job: (job, job, "cancel requested")
        for job in s.scalars(select(Job.id).where(Job.status == "queued", Job.cancel_requested.is_(True)))}
    changed = True
    while changed:
        changed = False
        for job, dep, status, _ in edges:
            if job in doomed:
                continue
            if status in ENDED_BADLY:
                doomed[job] = (dep, dep, status)
            elif status == "queued" and dep in doomed:
                doomed[job] = (dep, *doomed[dep][1:])
            else:
                continue
            changed = True
    return doomed


# -- claims ------------------------------------------------------------------------------


def claim(s: Session, worker: str, *, only: Iterable[int] | None = None,
          now: datetime | None = None) -> Job | None:
    """Take the next runnable job for ``worker`` (it is then ``running``), or None."""
    if s.get_bind().dialect.name == "postgresql":
        candidates = [s.scalar(_runnable(only, now).limit(1).with_for_update(skip_locked=True, of=Job))]
    else:
        candidates = list(s.scalars(_runnable(only, now).limit(SQLITE_CANDIDATES)))
    for job_id in filter(None, candidates):
        job = take(s, job_id, worker, now=now)
        if job is not None:
            return job
    return None


def take(s: Session, job_id: int, worker: str, *, now: datetime | None = None) -> Job | None:
    """Start this queued job for ``worker`` (a new row of its attempts); None if it is not queued (another worker
    took it)."""
    now = now or utcnow()
    stmt = (update(Job).where(Job.id == job_id, Job.status == "queued", Job.cancel_requested.is_(False))
            .values(status="running", runner=worker, attempts=Job.attempts + 1, started_at=now, heartbeat_at=now,
                    finished_at=None, error=None, traceback=None, not_before=None).returning(Job))
    job = s.scalars(stmt, execution_options=_REFRESH).one_or_none()
    if job is not None:
        s.add(JobAttempt(job_id=job_id, number=used_attempts(s, job_id) + 1, worker=worker, started_at=now,
                         outcome="running"))
        s.flush()
    return job


def steering(s: Session, job_id: int, worker: str) -> tuple[bool, bool]:
    """``(cancel requested, still run by worker)`` of a running job: what its loop must obey, in one query."""
    row = s.execute(select(Job.cancel_requested, Job.status, Job.runner).where(Job.id == job_id)).first()
    if row is None:
        return False, False
    return bool(row.cancel_requested), row.status == "running" and row.runner == worker


def release(s: Session, job_id: int, worker: str) -> bool:
    """Hand a running job back to the queue (its worker stops); True if it was this worker's."""
    stmt = (update(Job).where(Job.id == job_id, Job.status == "running", Job.runner == worker)
            .values(status="queued", runner=None).returning(Job.id))
    if s.execute(stmt).first() is None:
        return False
    end_attempt(s, job_id, "handed back")
    return True


def requeue_runner(s: Session, worker: str, *, now: datetime | None = None) -> tuple[list[int], list[int]]:
    """Queue again the jobs a worker of this name left running (it restarted after its process died): each lost
    one attempt. Returns ``(queued again, failed: out of attempts)``."""
    stmt = (update(Job).where(Job.status == "running", Job.runner == worker)
            .values(status="queued", runner=None).returning(Job.id))
    return died(s, sorted(s.scalars(stmt)), "its process died (restarted)", now=now)


# -- attempts and retries ----------------------------------------------------------------


def used_attempts(s: Session, job_id: int) -> int:
    """The runs of a job that ended in an error or with their worker dead (what ``max_attempts`` bounds)."""
    return s.scalar(select(func.count()).select_from(JobAttempt)
                    .where(JobAttempt.job_id == job_id, JobAttempt.outcome.in_(COUNTED), JobAttempt.counts)) or 0


def forgive_attempts(s: Session, job_id: int) -> None:
    """The job is resumed: it gets its ``max_attempts`` afresh (its runs so far stay listed)."""
    s.execute(update(JobAttempt).where(JobAttempt.job_id == job_id).values(counts=False))


def attempts(s: Session, job_id: int) -> list[JobAttempt]:
    return list(s.scalars(select(JobAttempt).where(JobAttempt.job_id == job_id).order_by(JobAttempt.id)))


def end_attempt(s: Session, job_id: int, outcome: str, error: str | None = None, *,
                now: datetime | None = None) -> None:
    """The job's run in progress ended (``outcome``: one of ``models.ATTEMPT_OUTCOMES``)."""
    s.execute(update(JobAttempt).where(JobAttempt.job_id == job_id, JobAttempt.outcome == "running")
              .values(outcome=outcome, error=error, ended_at=now or utcnow()))


def backoff(used: int, draw=random.random) -> float:
    """Seconds a job waits after its ``used``-th counted attempt: exponential, with jitter in [1/2, 1] of it."""
    return min(BACKOFF_CAP_SECONDS, BACKOFF_SECONDS * 2 ** (used - 1)) * (0.5 + 0.5 * draw())


def retry(s: Session, job_id: int, worker: str, error: str, *, now: datetime | None = None) -> float | None:
    """The run of ``worker`` raised ``error`` (not a user's mistake): queue the job again after its backoff and
    return the seconds it waits; None when it has used its attempts (the caller ends it failed, ``gave_up``).
    The caller holds the job (``steering``)."""
    now = now or utcnow()
    end_attempt(s, job_id, "error", error, now=now)
    used, job = used_attempts(s, job_id), get_job(s, job_id)
    if used >= job.max_attempts:
        return None
    wait = backoff(used)
    s.execute(update(Job).where(Job.id == job_id, Job.status == "running", Job.runner == worker)
              .values(status="queued", runner=None, error=None, not_before=now + timedelta(seconds=wait)))
    return wait


def gave_up(s: Session, job_id: int) -> str:
    """Why a job out of attempts failed: ``gave up after 3 attempts: the worker died each time (last: ...)``."""
    runs = [run for run in attempts(s, job_id) if run.outcome in COUNTED and run.counts]
    outcomes = {run.outcome for run in runs}
    each = {frozenset({"died"}): ": the worker died each time", frozenset({"error"}): ": it failed each time"}
    return f"gave up after {len(runs)} attempts{each.get(frozenset(outcomes), '')} (last: {runs[-1].error})"


def died(s: Session, job_ids: list[int], why: str, *, now: datetime | None = None) -> tuple[list[int], list[int]]:
    """Jobs just queued again because their worker died (``why``): each run counts as an attempt; those that used
    them all end failed (``gave_up``) with their dependents. Returns ``(queued again, failed)``."""
    now, failed = now or utcnow(), []
    for job_id in job_ids:
        run = s.scalar(select(JobAttempt).where(JobAttempt.job_id == job_id, JobAttempt.outcome == "running")
                       .order_by(JobAttempt.id.desc()).limit(1))
        end_attempt(s, job_id, "died", f"worker {run.worker if run else '?'} died: {why}", now=now)
        if used_attempts(s, job_id) < get_job(s, job_id).max_attempts:
            continue
        error = gave_up(s, job_id)
        s.execute(update(Job).where(Job.id == job_id, Job.status == "queued")
                  .values(status="failed", error=error, finished_at=now, heartbeat_at=now))
        fail_dependents(s, job_id, reason("failed", error), now=now)
        failed.append(job_id)
    return [job_id for job_id in job_ids if job_id not in failed], failed


def retrying(s: Session, *, now: datetime | None = None) -> list[Job]:
    """Queued jobs waiting out their backoff, soonest first."""
    stmt = select(Job).where(Job.status == "queued", Job.not_before > (now or utcnow())).order_by(Job.not_before)
    return list(s.scalars(stmt, execution_options=_REFRESH))


def stale_jobs(s: Session, stale_after: timedelta, *, now: datetime | None = None) -> list[Job]:
    cutoff = (now or utcnow()) - stale_after
    stmt = select(Job).where(Job.status == "running", Job.heartbeat_at < cutoff).order_by(Job.id)
    return list(s.scalars(stmt, execution_options=_REFRESH))


def is_stale(job: Job, stale_after: timedelta, now: datetime | None = None) -> bool:
    beat = job.heartbeat_at or job.started_at
    return job.status == "running" and beat is not None and (now or utcnow()) - beat > stale_after


def requeue_stale(s: Session, stale_after: timedelta, *,
                  now: datetime | None = None) -> tuple[list[int], list[int]]:
    """Put running jobs whose heartbeat is stale back in the queue, an attempt lost each (``died``); return
    ``(queued again, failed: out of attempts)``.

    Only the rows still stale when updated move, so two workers doing this at once agree.
    """
    cutoff = (now or utcnow()) - stale_after
    stmt = (update(Job).where(Job.status == "running", Job.heartbeat_at < cutoff, Job.cancel_requested.is_(False))
            .values(status="queued", runner=None).returning(Job.id))
    return died(s, sorted(s.scalars(stmt)), f"no heartbeat for {stale_after.total_seconds():.0f} s", now=now)


def cancel_stale(s: Session, stale_after: timedelta, *, now: datetime | None = None) -> list[int]:
    """End as cancelled the stale running jobs whose cancel was requested (no runner is left to do it), failing
    their dependents; return their ids. Only the rows still stale when updated move (two workers agree)."""
    now = now or utcnow()
    stmt = (update(Job).where(Job.status == "running", Job.heartbeat_at < now - stale_after,
                              Job.cancel_requested.is_(True))
            .values(status="cancelled", finished_at=now, heartbeat_at=now).returning(Job.id))
    return _ended_cancelled(s, sorted(s.scalars(stmt)), now)


def _ended_cancelled(s: Session, ids: list[int], now: datetime) -> list[int]:
    for job_id in ids:
        end_attempt(s, job_id, "cancelled", "its worker died", now=now)
        fail_dependents(s, job_id, "was cancelled", now=now)
    return ids


# -- what the queue looks like ------------------------------------------------------------


def position(s: Session, job: Job, now: datetime | None = None) -> int | None:
    """1 for the next runnable job, 2 for the one after...; None if the job is not runnable."""
    ahead = _runnable(now=now).subquery()
    ids = list(s.scalars(select(ahead.c.id)))
    return ids.index(job.id) + 1 if job.id in ids else None


def queued_counts(s: Session) -> dict[str, int]:
    """How many queued jobs are runnable and how many wait for a dependency."""
    total = s.scalar(select(func.count()).select_from(Job).where(Job.status == "queued")) or 0
    waiting = s.scalar(select(func.count()).select_from(Job).where(Job.status == "queued", _unmet())) or 0
    return {"runnable": total - waiting, "waiting": waiting}


def runnable_jobs(s: Session, limit: int = 100, only: Iterable[int] | None = None) -> list[Job]:
    ids = list(s.scalars(_runnable(only).limit(limit)))
    return [get_job(s, job_id) for job_id in ids]


# -- workers -----------------------------------------------------------------------------


def register_worker(s: Session, *, name: str, host: str, pid: int, address: str | None, max_jobs: int,
                    resources: dict | None = None, node_id: str | None = None, actor_id: str | None = None,
                    now: datetime | None = None) -> Worker:
    """Record a worker (again, when a restarted actor keeps its name), what its Ray offers (``resources``), and
    where it runs on that Ray (``node_id``; ``actor_id`` for a detached worker)."""
    now = now or utcnow()
    values = dict(host=host, pid=pid, address=address, max_jobs=max_jobs, started_at=now, heartbeat_at=now,
                  stopped_at=None, resources=resources, free=resources, node_id=node_id, actor_id=actor_id)
    return _upsert(s, Worker, {"name": name}, values, values)


def worker_heartbeat(s: Session, name: str, job_ids: Iterable[int] = (), *, free: dict | None = None,
                     now: datetime | None = None) -> None:
    """The worker and the jobs it runs are alive; ``free``: what its jobs leave of its resources."""
    now = now or utcnow()
    values = {"heartbeat_at": now} if free is None else {"heartbeat_at": now, "free": free}
    s.execute(update(Worker).where(Worker.name == name).values(**values))
    ids = list(job_ids)
    if ids:
        s.execute(update(Job).where(Job.id.in_(ids), Job.status == "running", Job.runner == name)
                  .values(heartbeat_at=now))


def stop_worker(s: Session, name: str, *, now: datetime | None = None) -> None:
    s.execute(update(Worker).where(Worker.name == name).values(stopped_at=now or utcnow()))


def serve_again(s: Session, name: str, *, now: datetime | None = None) -> None:
    """A worker that had stopped serving (``stop_worker``) is alive again."""
    s.execute(update(Worker).where(Worker.name == name).values(stopped_at=None, heartbeat_at=now or utcnow()))


def workers_on(s: Session, host: str) -> list[Worker]:
    """The workers registered on ``host`` that have not stopped (alive, or dead without a word: killed)."""
    return list(s.scalars(select(Worker).where(Worker.host == host, Worker.stopped_at.is_(None)).order_by(Worker.id)))


def ray_workers(s: Session) -> list[Worker]:
    """The workers that have not stopped and recorded where they run on a Ray (a node, an actor)."""
    placed = or_(Worker.node_id.is_not(None), Worker.actor_id.is_not(None))
    return list(s.scalars(select(Worker).where(Worker.stopped_at.is_(None), placed).order_by(Worker.id)))


def retire_worker(s: Session, name: str, *, why: str = "its process is gone", started_at: datetime | None = None,
                  now: datetime | None = None) -> tuple[list[int], list[int], list[int]]:
    """A worker whose process is known dead (killed): it stops, its running jobs go back to the queue at once
    (they resume from what is stored; an attempt lost each, ``died``) and those whose cancel was requested end
    cancelled. With ``started_at`` (when the dead one registered), nothing happens when the worker of that name
    registered again since (a restarted actor, which takes its jobs back itself).

    Returns ``(queued again, failed: out of attempts, cancelled)``; the updates are conditional, so two workers
    doing this at once agree.
    """
    now = now or utcnow()
    if started_at is not None and s.scalar(select(Worker.started_at).where(Worker.name == name)) != started_at:
        return [], [], []
    stop_worker(s, name, now=now)
    mine = and_(Job.status == "running", Job.runner == name)
    queued = s.scalars(update(Job).where(mine, Job.cancel_requested.is_(False))
                       .values(status="queued", runner=None).returning(Job.id))
    requeued, failed = died(s, sorted(queued), why, now=now)
    ended = s.scalars(update(Job).where(mine, Job.cancel_requested.is_(True))
                      .values(status="cancelled", finished_at=now, heartbeat_at=now).returning(Job.id))
    return requeued, failed, _ended_cancelled(s, sorted(ended), now)


def quiet_running(s: Session, quiet_for: timedelta, *, besides: str | None = None,
                  now: datetime | None = None) -> list[Job]:
    """Running jobs (not run by ``besides``) without a heartbeat for ``quiet_for``: their worker may be dead, and
    then they go back to the queue once stale. A draining worker waits for them."""
    cutoff = (now or utcnow()) - quiet_for
    stmt = select(Job).where(Job.status == "running", Job.heartbeat_at < cutoff)
    if besides is not None:
        stmt = stmt.where(Job.runner.is_distinct_from(besides))
    return list(s.scalars(stmt.order_by(Job.id), execution_options=_REFRESH))


def live_workers(s: Session, stale_after: timedelta, *, now: datetime | None = None) -> list[Worker]:
    cutoff = (now or utcnow()) - stale_after
    stmt = select(Worker).where(and_(Worker.stopped_at.is_(None), Worker.heartbeat_at >= cutoff)).order_by(Worker.id)
    return list(s.scalars(stmt))
