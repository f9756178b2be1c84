"""Queue overhead: many tiny certify jobs drained by one warm worker, against their own sampling time.

A job's overhead is everything that is not sampling: the claim, loading its spec, its sampler
actors (started or reused), the memory probe, the database writes and the worker's polling. It is
measured as (wall time of the drain - sampling seconds the jobs stored) / jobs, with Ray already
started (a warm worker) and one job at a time, on a temporary SQLite database and the digits pair.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from bench.config import PAIRS
from bench.rayjobs import save_pair
from dsq import jobs
from dsq.db import repo
from dsq.db.session import open_database, session_scope
from dsq.settings import Settings
from workers import resources
from workers.worker import QueueWorker
from dsq.kinds.certify import CertifySpec


def measure(jobs_count: int = 50, *, n: int = 100, threads: int | None = None, log=print) -> dict:
    """Drain ``jobs_count`` one-image certify jobs (n0 = 10, n samples) with sampler actors reused between
    jobs (the worker's default), reused while the jobs alternate between two f o D (each call names its models),
    and, side by side, started anew for each job; return the three timings."""
    resources.connect(None, num_cpus=threads)
    variants = (("reused", True, 1), ("reused, 2 f o D alternating", True, 2), ("per job", False, 1))
    return {variant: _drain(jobs_count, n, reuse, pairs, log) for variant, reuse, pairs in variants}


def _drain(jobs_count: int, n: int, reuse: bool, pairs: int, log) -> dict:
    with tempfile.TemporaryDirectory(prefix="dsq-queue-bench-") as tmp:
        home = Path(tmp)
        settings = Settings(database_url=f"sqlite:///{home / 'bench.db'}", home=home, autostart=False)
        models = [save_pair(PAIRS["digits"], seed, _folder(home / f"pair{seed}")) for seed in range(pairs)]
        engine = open_database(settings.database_url)
        specs = [CertifySpec(dataset="digits", classifier=classifier, denoiser=denoiser, sigma=0.25, n0=10, n=n,
                             batch_size=100, max_images=1, workers=1, previews=0) for classifier, denoiser in models]
        with session_scope(engine) as session:
            ids = [jobs.submit(session, specs[i % pairs], settings).id for i in range(jobs_count)]
        log(f"queue bench: {jobs_count} jobs of 1 image x {10 + n} samples on {pairs} f o D, sampler actors "
            f"{'reused' if reuse else 'started for each job'}")
        started = time.perf_counter()
        summary = QueueWorker(settings, drain=True, max_jobs=1, log=lambda line: None, reuse_samplers=reuse).run()  # one at a time:
        # the jobs' own sampling seconds then add up to the part of the wall time that is not overhead
        wall = time.perf_counter() - started
        with session_scope(engine) as session:
            sampling = sum(r.seconds for job_id in ids for r in repo.results_for_job(session, job_id))
            first = repo.get_job(session, ids[0])
            first_s = (first.finished_at - first.started_at).total_seconds()
        engine.dispose()
    succeeded = sum(status == "succeeded" for status in summary.ran.values())
    return {"jobs": jobs_count, "succeeded": succeeded, "wall_s": wall, "sampling_s": sampling,
            "overhead_per_job_s": (wall - sampling) / jobs_count, "first_job_s": first_s,
            "jobs_per_s": jobs_count / wall}


def _folder(path: Path) -> Path:
    path.mkdir()
    return path
