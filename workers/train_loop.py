"""Run a train job: one TrainerActor trains the model while the loop watches cancel and stop requests (a worker keeps
the actor's process for its next training)."""

from __future__ import annotations

import ray

from dsq.db import repo
from dsq.db.session import session_scope
from workers import resources
from workers.loop import POLL_SECONDS, Control
from workers.pool import ActorPool
from workers.trainer import TrainerActor


def run(engine, settings, job_id: int, spec, control: Control) -> None:
    options, threads = resources.actor_options(1, resources.sized_for(control))
    gpu = "num_gpus" in options
    threads = 1 if not gpu else threads
    device = resources.device_for(gpu)
    pool = control.pool or ActorPool()
    key = ("trainer", settings, threads, device, tuple(sorted(options.items())))  # settings: its database
    [actor] = pool.acquire(key, 1, lambda: TrainerActor.options(**options).remote(settings, threads, device))
    ended = False
    try:
        pending = actor.train.remote(job_id, spec)
        while not ray.wait([pending], timeout=POLL_SECONDS)[0]:
            control.check(engine, job_id)
            _report(engine, job_id, control)
        ray.get(pending)
        _report(engine, job_id, control)
        ended = True
    finally:
        # a cancelled or stopped training is ended with its process; a finished one's process serves the next
        pool.release(key, [actor], ended and control.pool is not None)


def _report(engine, job_id: int, control: Control) -> None:
    if control.on_progress:
        with session_scope(engine) as session:
            job = repo.get_job(session, job_id)
            control.report(job.progress_done, job.progress_total)
