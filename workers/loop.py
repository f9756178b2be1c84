"""What the job loops share: how a running job is steered, and one reply at a time with cancel honoured."""

from __future__ import annotations

import threading
import time

import ray

from dsq import jobqueue
from dsq.db import repo
from dsq.db.session import session_scope
from dsq.errors import JobCancelled, JobInterrupted

POLL_SECONDS = 0.5  # how often a loop looks at cancel and hand-back: a stop lands within a second
SETTLE_SECONDS = 5.0  # a shard takes well under a second on the default batch; a stop waits no longer than this


class Control:
    """A running job's link to its worker: who runs it, a progress callback, and a stop request.

    ``check`` is called every POLL_SECONDS by the loops: it raises JobCancelled after ``dsq cancel``, or
    JobInterrupted when the worker stops (or another worker took the job over after a stale heartbeat).
    The heartbeat itself is the worker's to write (``jobqueue.worker_heartbeat``), for all its jobs at once.
    """

    def __init__(self, runner: str = "local", on_progress=None, pool=None, demand: dict | None = None,
                 cluster: dict | None = None):
        self.runner, self.on_progress = runner, on_progress
        self.pool = pool  # a worker's ActorPool, so jobs reuse actor processes (None: each job starts its own)
        self.demand = demand  # what the worker holds for the job (its kind's demand); None: not run by a worker
        # the resources the worker sized the job for (Ray's, with the GPUs its autoscaler may launch); None: Ray's
        self.cluster = cluster
        self.stop = threading.Event()

    def check(self, engine, job_id: int) -> None:
        if self.stop.is_set():
            raise JobInterrupted(f"job {job_id}: its worker is stopping")
        with session_scope(engine) as session:
            cancel_requested, ours = jobqueue.steering(session, job_id, self.runner)
        if cancel_requested:
            raise JobCancelled(f"job {job_id} was cancelled")
        if not ours:
            raise JobInterrupted(f"job {job_id} is no longer run by {self.runner}")

    def report(self, done: int, total: int) -> None:
        if self.on_progress:
            self.on_progress(done, total)


class JobLoop:
    """Holds the Ray references in flight (``in_flight``) and the job's progress."""

    def __init__(self, engine, job_id: int, control: Control, *, done: int, total: int):
        self.engine, self.job_id, self.control = engine, job_id, control
        self.done, self.total = done, total
        self.in_flight: dict = {}
        self.last_check = 0.0

    def ready(self) -> list:
        """Replies ready within POLL_SECONDS (at most one); raises once the job is cancelled or handed back."""
        ready = []
        if self.in_flight:
            ready, _ = ray.wait(list(self.in_flight), num_returns=1, timeout=POLL_SECONDS)
        if time.monotonic() - self.last_check > POLL_SECONDS:
            self.control.check(self.engine, self.job_id)
            self.last_check = time.monotonic()
        return ready

    def advance(self, session) -> None:
        """One more work item done: store the progress in ``session`` (call ``report`` after)."""
        self.done += 1
        repo.set_progress(session, self.job_id, self.done, self.total)

    def report(self) -> None:
        self.control.report(self.done, self.total)


def settle(in_flight, seconds: float = SETTLE_SECONDS) -> None:
    """Let the tasks in flight finish (their results are dropped) before their actors are killed."""
    if in_flight:
        ray.wait(list(in_flight), num_returns=len(in_flight), timeout=seconds)
