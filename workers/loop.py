"""What the certify loops share: wait for one reply at a time, honour cancel, record progress."""

from __future__ import annotations

import time

import ray

from dsq import jobs
from dsq.db import repo

POLL_SECONDS = 0.5


class JobLoop:
    """Holds the Ray references in flight (``in_flight``) and the job's progress."""

    def __init__(self, engine, job_id: int, *, done: int, total: int, on_progress=None):
        self.engine, self.job_id = engine, job_id
        self.done, self.total, self.on_progress = done, total, on_progress
        self.in_flight: dict = {}
        self.last_check = 0.0

    def ready(self) -> list:
        """Replies ready within POLL_SECONDS (at most one); raises JobCancelled once the job is cancelled."""
        ready = []
        if self.in_flight:
            ready, _ = ray.wait(list(self.in_flight), num_returns=1, timeout=POLL_SECONDS)
        if time.monotonic() - self.last_check > POLL_SECONDS:
            jobs.check_cancel(self.engine, self.job_id)
            self.last_check = time.monotonic()
        return ready

    def advance(self, session) -> None:
        """One more work item done: store the progress and a heartbeat in ``session`` (call ``report`` after)."""
        self.done += 1
        repo.set_progress(session, self.job_id, self.done, self.total)
        repo.heartbeat(session, self.job_id)

    def report(self) -> None:
        if self.on_progress:
            self.on_progress(self.done, self.total)
