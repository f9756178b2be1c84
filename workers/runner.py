"""Run one job to its end on the connected Ray, and record how it ended.

The worker (``workers/worker.py``) calls ``run_job`` in a thread per job it claimed; ``LOOPS`` gives the
loop that does the work of the job's kind (``dsq.kinds``). The database is the source of truth:
images already stored are skipped, so a job that was handed back or taken over resumes with
only what is missing.
"""

from __future__ import annotations

import re
import traceback

import ray

from dsq import errors, jobqueue, jobs, kinds
from dsq.db import repo
from dsq.db.session import database_back, is_outage, make_engine, session_scope
from dsq.errors import BudgetReached, DsqError, JobCancelled, JobInterrupted, JobStateError
from dsq.settings import Settings
from workers import api_runner, certify_loop, preview_loop, train_loop
from workers.loop import Control

# Each job kind's loop: (engine, settings, job_id, spec, control) -> None. A new kind adds its module in
# dsq/kinds/ and its loop here.
LOOPS = {"train": train_loop.run, "certify": certify_loop.run, "certify_api": api_runner.run,
         "preview": preview_loop.run}
# Outages a run rides out (each shorter than the grace) before it leaves its job to be taken over.
OUTAGES_RIDDEN = 5


def run_job(settings: Settings, job_id: int, control: Control | None = None, spec=None) -> str:
    """Run a job claimed by ``control.runner`` (or still queued) to its end; return its status.

    A job whose worker stops goes back to the queue (status ``queued``). ``spec``: the job's spec when the
    caller has already rebuilt it from the row (the worker, for its demand), else rebuilt here.
    """
    control = control or Control()
    engine = make_engine(settings.database_url, retry_seconds=settings.db_grace_seconds)
    try:
        stored = _start(engine, job_id, control.runner)
        spec = spec or kinds.from_dict(stored)
        try:
            _run_loop(engine, settings, job_id, spec, control)
        except Exception as failure:  # noqa: BLE001 - a job keeps any failure with its traceback
            cause = _cause(failure)
            if isinstance(cause, JobInterrupted):
                return _hand_back(engine, job_id, control.runner, cause)
            if control.stop.is_set() and not isinstance(cause, DsqError):  # its actors went with the stopping worker
                stopped = JobInterrupted(f"its worker stopped: {_message(cause)}")
                return _hand_back(engine, job_id, control.runner, stopped)
            if is_outage(cause):  # nothing can be recorded: the job stays "running" and goes stale
                return LOST
            if not isinstance(cause, DsqError):  # not the user's mistake: retried while it has attempts left
                with session_scope(engine) as session:
                    return jobs.fail_or_retry(session, job_id, control.runner, _message(cause),
                                              traceback.format_exc())
            status = "cancelled" if isinstance(cause, JobCancelled) else "budget" if isinstance(
                cause, BudgetReached) else "failed"
            error = None if status == "cancelled" else _message(cause)
            trace = traceback.format_exc() if status == "failed" else None
        else:
            status, error, trace = "succeeded", None, None
        with session_scope(engine) as session:
            jobs.finish(session, job_id, status, error=error, traceback=trace)
        return status
    finally:
        engine.dispose()


LOST = "lost"  # the database went away: the job is taken over once it is back and the heartbeat is stale


def _run_loop(engine, settings: Settings, job_id: int, spec, control: Control) -> None:
    """The kind's loop. A PostgreSQL server that went away and answers again within the grace costs a pause: the
    loop goes on from what is stored (answers, results), as a resumed job would, under the same claim."""
    for outage in range(OUTAGES_RIDDEN + 1):
        try:
            return LOOPS[spec.kind](engine, settings, job_id, spec, control)
        except Exception as failure:  # noqa: BLE001 - re-raised unless it is an outage the database came back from
            cause = _cause(failure)
            if not (is_outage(cause) and engine.dialect.name == "postgresql" and outage < OUTAGES_RIDDEN
                    and database_back(engine, settings.db_grace_seconds)):
                raise
        with session_scope(engine) as session:
            repo.add_log(session, job_id, "the database went away and came back: going on from the stored results",
                         level="warning")


def _start(engine, job_id: int, runner: str):
    with session_scope(engine) as session:
        job = repo.get_job(session, job_id)
        if job.status == "queued":
            job = jobqueue.take(session, job_id, runner)
        if job is None or job.status != "running" or job.runner != runner:
            raise JobStateError(f"job {job_id} is not for {runner} to run")
        repo.add_log(session, job_id, f"running on {runner} (attempt {job.attempts})")
        return job.spec


def _hand_back(engine, job_id: int, runner: str, why: JobInterrupted) -> str:
    with session_scope(engine) as session:
        if jobqueue.release(session, job_id, runner):
            repo.add_log(session, job_id, f"handed back to the queue ({why}); it resumes from its stored results")
        return repo.get_job(session, job_id).status


def _cause(failure: BaseException) -> BaseException:
    """The exception raised inside an actor, not Ray's wrapper around it."""
    while isinstance(failure, ray.exceptions.RayTaskError) and failure.cause is not None:
        failure = failure.cause
    if isinstance(failure, ray.exceptions.ActorDiedError) and failure.actor_init_failed:
        # Ray keeps only the text of an error raised in an actor's __init__ (a model file changed since submit, say):
        # a dsq error there is the user's, which must fail the job at once, not be retried; rebuilt from its line.
        raised = re.findall(r"^dsq\.errors\.(\w+): (.*)$", str(failure), re.MULTILINE)
        kind = getattr(errors, raised[-1][0], None) if raised else None
        if isinstance(kind, type) and issubclass(kind, DsqError):
            return kind(raised[-1][1])
    return failure


def _message(cause: BaseException) -> str:
    return str(cause) if isinstance(cause, DsqError) else f"{type(cause).__name__}: {cause}"
