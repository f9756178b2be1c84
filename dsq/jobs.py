"""Job lifecycle verbs: submit, cancel, resume, finish.

Functions take a Session (the caller owns the transaction). The queue's mechanics (claims,
dependencies, stale jobs) are in ``dsq.jobqueue``; each kind's checks in ``dsq.kinds``; model
references in ``dsq.references``; what ``dsq status`` prints in ``dsq.views``.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta
from typing import Iterable

from sqlalchemy.orm import Session

from dsq import checks, jobqueue, kinds, references, specs, uploads, usermodels
from dsq.db import repo
from dsq.db.models import DEFAULT_MAX_ATTEMPTS, utcnow
from dsq.errors import InvalidArgument, JobNotFound, JobStateError
from dsq.settings import Settings

MAX_PRIORITY = 1_000_000  # any order users need fits; keeps the column a plain 32-bit integer


def submit(session: Session, spec, settings: Settings, *, priority: int = 0, after: Iterable[int] = (),
           experiment: str | None = None, meta: dict | None = None, max_attempts: int = DEFAULT_MAX_ATTEMPTS,
           upload: bool = True, say=None):
    """Check a spec against the database and the disk, then queue it as a job that waits for its dependencies.

    With ``upload`` its local files and folders go to the artifact store first (``dsq.uploads``; ``say`` hears a
    line for each), so that any node can run it; a failed upload queues nothing.
    """
    kind = kinds.get(spec.kind)
    if not isinstance(priority, int) or isinstance(priority, bool) or abs(priority) > MAX_PRIORITY:
        raise InvalidArgument(f"priority must be an integer in [-{MAX_PRIORITY}, {MAX_PRIORITY}], got {priority!r}")
    max_attempts = checks.positive_int("max attempts", max_attempts)
    spec = _pin_classes(usermodels.pin(spec), settings)
    options = getattr(spec, "models", {})
    depends = {references.check(session, reference, role, options.get(reference))
               for reference, role in spec.model_roles()} - {None}
    depends |= {_check_after(session, number) for number in after}
    total = kind.check(session, spec, settings)
    if upload:
        spec = uploads.upload(spec, settings, say)
    job = repo.create_job(session, kind=spec.kind, spec=spec.to_dict(), seed=spec.seed, name=spec.name, total=total,
                          priority=priority, experiment=experiment, meta=meta, max_attempts=max_attempts)
    jobqueue.add_dependencies(session, job.id, depends)
    waits = f"; waits for job(s) {', '.join(map(str, sorted(depends)))}" if depends else ""
    repo.add_log(session, job.id, f"submitted {spec.kind} job ({total} work items, priority {priority}){waits}")
    if getattr(spec, "classes", None):
        repo.add_log(session, job.id, f"class order of {spec.dataset}: {specs.class_order(spec.classes)}")
    return job


def _pin_classes(spec, settings: Settings):
    """A folder dataset's spec with its class order: the given one, else the folder's (sorted), so that the job
    reads its labels in the order it was checked with."""
    if getattr(spec, "classes", ()) is not None or not (spec.dataset or "").startswith("folder"):
        return spec
    from dsq import datasets  # torch: a submission loads data anyway

    found = datasets.folder_classes(spec.dataset, getattr(spec, "split", "train"), root=settings.data_root_of(spec))
    return dataclasses.replace(spec, classes=tuple(found))


def _check_after(session: Session, number: int) -> int:
    try:
        job = repo.get_job(session, number)
    except JobNotFound:
        raise InvalidArgument(f"--after {number}: no job with id {number}") from None
    if job.status in references.DEAD:
        raise InvalidArgument(f"--after {number}: job {number} {jobqueue.reason(job.status, job.error)}; "
                              f"resume it first")
    return number


def cancel(session: Session, job_id: int, stale_after: timedelta):
    """Stop a job: queued, waiting and stale jobs end at once; a running one's runner stops within seconds."""
    job = repo.request_cancel(session, job_id)
    repo.add_log(session, job_id, "cancel requested")
    if job.status == "queued" or jobqueue.is_stale(job, stale_after):
        return finish(session, job_id, "cancelled")
    return job


def finish(session: Session, job_id: int, status: str, error: str | None = None, traceback: str | None = None):
    """The job ended; a failed, cancelled or budget one fails the jobs waiting for it, transitively."""
    job = repo.mark_finished(session, job_id, status, error=error, traceback=traceback)
    jobqueue.end_attempt(session, job_id, status, error)
    repo.add_log(session, job_id, status + (f": {error}" if error else ""), level="error" if error else "info")
    if status != "succeeded":
        reason = jobqueue.reason(status, error)
        for dependent in jobqueue.fail_dependents(session, job_id, reason):
            repo.add_log(session, dependent, f"not run: dependency job {job_id} {reason}", level="error")
    return job


def fail_or_retry(session: Session, job_id: int, runner: str, error: str, traceback: str | None = None, *,
                  now: datetime | None = None) -> str:
    """The run of ``runner`` raised an unexpected error: queue the job again after a backoff while it has attempts
    left, else end it failed ("gave up after N attempts"). Returns its status.

    A run whose job was taken over meanwhile (its runner presumed dead) changes nothing: the job, its attempt and
    its attempts left belong to the run that holds it now."""
    if not jobqueue.steering(session, job_id, runner)[1]:
        repo.add_log(session, job_id, f"a run on {runner} that no longer held the job failed: {error}",
                     level="warning")
        return repo.get_job(session, job_id).status
    wait = jobqueue.retry(session, job_id, runner, error, now=now)
    if wait is None:
        return finish(session, job_id, "failed", error=jobqueue.gave_up(session, job_id), traceback=traceback).status
    job = repo.get_job(session, job_id)
    used = jobqueue.used_attempts(session, job_id)
    repo.add_log(session, job_id, f"attempt {used} of {job.max_attempts} failed: {error}; retrying in {wait:.0f} s",
                 level="warning")
    return job.status


def resume(session: Session, job_id: int, stale_after: timedelta, *, now: datetime | None = None) -> list[int]:
    """Queue a job again (it skips what is stored); jobs its failure had failed are queued with it, unless another
    of their dependencies failed or was cancelled too (they stay failed, blocked by that one).

    Refused for a succeeded job, a job still running (fresh heartbeat), and a job whose
    dependency failed or was cancelled (resume that one first). Returns the re-queued dependents.
    """
    job = repo.get_job(session, job_id)
    if job.status == "succeeded":
        raise JobStateError(f"job {job_id} already succeeded; nothing to resume")
    if job.status == "queued":
        raise JobStateError(f"job {job_id} is already queued")
    now = now or utcnow()
    if job.status == "running" and not jobqueue.is_stale(job, stale_after, now):
        age = (now - (job.heartbeat_at or job.started_at)).total_seconds()
        raise JobStateError(f"job {job_id} is running (last heartbeat {age:.0f} s ago); cancel it first")
    if job.status == "budget":
        _check_budget(session, job)
    for dependency in jobqueue.unmet(session, job_id):
        if dependency.status in references.DEAD:
            root = dependency.blocked_by or dependency.id  # a dependent failed with its dependency: resume the root
            raise JobStateError(f"job {job_id} depends on job {dependency.id}, which {dependency.status}: "
                                f"resume job {root} first")
    if job.status == "running":  # stale: its worker went silent
        jobqueue.end_attempt(session, job_id, "died", f"worker {job.runner} went silent; resumed by hand")
    repo.mark_queued(session, job_id)
    jobqueue.forgive_attempts(session, job_id)
    blocked = jobqueue.blocked_jobs(session, job_id)
    requeued = jobqueue.requeue_blocked(session, job_id)
    repo.add_log(session, job_id, "resumed" + (f"; queued again: jobs {requeued}" if requeued else ""))
    for dependent in requeued:
        repo.add_log(session, dependent, f"queued again: dependency job {job_id} was resumed")
    for dependent in sorted(set(blocked) - set(requeued)):  # another dependency of theirs ended too
        error = repo.get_job(session, dependent).error
        repo.add_log(session, dependent, f"still not run: {error}", level="error")
    return requeued


def _check_budget(session: Session, job) -> None:
    """A job stopped at its query budget resumes only with a larger one (``dsq resume N --max-queries M``)."""
    budget, paid = (job.spec or {}).get("max_queries"), repo.count_paid_api_answers(session, job.id)
    if budget is not None and budget <= paid:
        raise InvalidArgument(f"job {job.id} stopped at its query budget ({paid} of {budget} queries paid): resume it "
                              f"with a larger one, dsq resume {job.id} --max-queries M with M > {paid}")


def delete(session: Session, job_ids: Iterable[int], stale_after: timedelta, *, artifacts: bool = False):
    """Delete jobs and everything they stored, in the caller's transaction; return the artifact rows they had.

    Refused, deleting nothing, for a job that runs (cancel it first) and for a job that a queued or running job
    outside ``job_ids`` depends on. Artifacts stay (as rows of no job) unless ``artifacts``.
    """
    ids = sorted(set(job_ids))
    for job_id in ids:
        job = repo.get_job(session, job_id)
        if job.status == "running":
            stale = " (stale)" if jobqueue.is_stale(job, stale_after) else ""
            raise JobStateError(f"job {job_id} is running{stale}: cancel it first (dsq cancel {job_id})")
        for dependent in jobqueue.dependents(session, job_id):
            status = repo.get_job(session, dependent).status
            if dependent not in ids and status in ("queued", "running"):
                raise JobStateError(f"job {dependent} ({status}) depends on job {job_id}: cancel or delete it first")
    return repo.delete_jobs(session, ids, artifacts=artifacts)


def load_spec(session: Session, job_id: int):
    return kinds.from_dict(repo.get_job(session, job_id).spec)
