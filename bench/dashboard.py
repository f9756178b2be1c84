"""``dsq bench --dashboard``: render times of the dashboard's pages on an experiment of 200,000 result rows.

The database holds one experiment of ``METHODS`` x ``SIGMAS`` certifications of ``IMAGES`` images each (10,000 x 4 x 5
= 200,000 rows by default), written in bulk with made-up but well-formed certificates; each page is then requested
``repeats`` times through Starlette's TestClient (the whole application: routing, the token guard off, the
database, the templates): the first request on its own (the cold view: nothing kept yet), then the p50 and p95 of
the others. Run on SQLite and, given a server URL, on PostgreSQL. Each database's verdict says whether every page
of the target (``TARGET_PAGES``) answered within ``TARGET_MS``, its first view included.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from datetime import timedelta

METHODS = ("no denoiser", "MSE", "STAB+MSE", "CLF", "diffusion")
SIGMAS = (0.12, 0.25, 0.5, 1.0)
IMAGES = 10_000
CHUNK = 5_000  # rows per bulk INSERT
TARGET_MS = 500  # every page of the target, first view and p95
# the pages the target covers: all but /api/jobs/{id}, every image of a job (megabytes), kept out of it
TARGET_PAGES = ("queue", "live poll", "job", "image", "experiment", "api experiment")


def build(url: str, images: int = IMAGES, seed: int = 0) -> dict:
    """An experiment named ``bench`` in a fresh database at ``url``: its job ids, an abstained image."""
    from sqlalchemy import insert, text

    from dsq.db import repo
    from dsq.db.models import Result
    from dsq.db.session import open_database, session_scope

    rng = random.Random(seed)
    engine = open_database(url)
    ids = []
    with session_scope(engine) as session:
        for method in METHODS:
            for sigma in SIGMAS:
                spec = {"sigma": sigma, "n": 100_000, "alpha": 0.001, "classifier": "f.pt", "dataset": "cifar10"}
                job = repo.create_job(session, kind="certify", spec=spec, seed=0, name=f"{method} s={sigma:g}",
                                      total=images, experiment="bench", meta={"method": method, "sigma": sigma})
                repo.mark_running(session, job.id, "bench")
                repo.set_progress(session, job.id, images)
                repo.mark_finished(session, job.id, "succeeded")
                ids.append(job.id)
    abstained = None
    for job_id, sigma in zip(ids, SIGMAS * len(METHODS)):
        rows = []
        for index in range(images):
            label, draw = index % 10, rng.random()
            prediction = label if draw < 0.75 else -1 if draw < 0.9 else (label + 1) % 10
            radius = 0.0 if prediction == -1 else rng.uniform(0.0, 3.7 * sigma)
            top = rng.randint(50_000, 100_000) if prediction != -1 else rng.randint(30_000, 50_000)
            counts = [0] * 10
            counts[max(prediction, 0)] = top
            counts[(label + 3) % 10] = 100_000 - top
            abstained = index if prediction == -1 and abstained is None else abstained
            rows.append(dict(job_id=job_id, image_index=index, label=label, prediction=prediction, radius=radius,
                             correct=prediction == label, p_lower=0.5 + radius / 10, counts_selection=counts[:],
                             counts_estimation=counts, n0=100, n=100_000, alpha=0.001, sigma=sigma, seconds=1.5,
                             worker="bench", device="cpu", extra={"model": {"precision": "fp32"}}))
        with engine.begin() as connection:
            for start in range(0, len(rows), CHUNK):
                connection.execute(insert(Result), rows[start:start + CHUNK])
    if engine.dialect.name == "postgresql":  # what autovacuum does within a minute of a bulk load: statistics, and
        with engine.connect() as connection:  # the visibility map an index-only scan needs, not raced by the pages
            connection.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE results"))
    engine.dispose()
    return {"jobs": ids, "abstained": abstained}


def pages(built: dict) -> dict[str, str]:
    job, image = built["jobs"][0], built["abstained"]
    return {"queue": "/", "live poll": "/api/queue", "job": f"/jobs/{job}", "image": f"/jobs/{job}/images/{image}",
            "experiment": "/experiments/bench", "api job": f"/api/jobs/{job}", "api experiment": "/api/experiments/bench"}


def measure(url: str, built: dict, repeats: int) -> dict[str, dict[str, float]]:
    """Each page's first request (ms: cold, nothing kept; and the CPU time this process used for it, which a
    loaded machine does not stretch: the app and SQLite, not a PostgreSQL server) and the p50 and p95 of
    ``repeats`` more, on one app started as ``dsq dashboard`` starts it."""
    from starlette.testclient import TestClient

    from dsq.dashboard.app import create_app
    from dsq.db.session import open_database

    engine = open_database(url, read_only=True)
    found = {}
    with TestClient(create_app(engine, timedelta(seconds=60))) as client:
        for name, path in pages(built).items():
            first, used = time.perf_counter(), time.process_time()
            assert client.get(path).status_code == 200, path
            cold, cpu = time.perf_counter() - first, time.process_time() - used
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                answer = client.get(path)
                times.append(time.perf_counter() - start)
                assert answer.status_code == 200, path
            times.sort()
            found[name] = {"first_ms": 1000 * cold, "first_cpu_ms": 1000 * cpu,
                           "p50_ms": 1000 * statistics.median(times),
                           "p95_ms": 1000 * times[min(len(times) - 1, round(0.95 * (len(times) - 1)))],
                           "bytes": len(answer.content)}
    engine.dispose()
    return found


def postgres_server():
    """A throw-away PostgreSQL server from the pgserver wheel (as the tests start one): (URL, stop)."""
    import tempfile
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

    server = pgserver.get_server(tempfile.mkdtemp(prefix="dsq-bench-pg-"), cleanup_mode="delete")
    return server.get_uri(), server.cleanup


def run(images: int, repeats: int, postgres: str | None) -> dict:
    """Build and measure on SQLite (a temporary file) and on PostgreSQL (``postgres``, else a pgserver one)."""
    import tempfile
    from pathlib import Path

    found = {}
    with tempfile.TemporaryDirectory(prefix="dsq-bench-dashboard-") as folder:
        url = f"sqlite:///{Path(folder) / 'dsq.db'}"
        found["sqlite"] = _one(url, images, repeats)
    stop = None
    if postgres is None:
        postgres, stop = postgres_server()
    try:
        found["postgresql"] = _one(postgres, images, repeats)
    finally:
        if stop is not None:
            stop()
    return found


def verdict(times: dict[str, dict[str, float]]) -> dict:
    """Whether every page of the target answered within TARGET_MS, first view and p95; the pages that did not."""
    missed = [page for page in TARGET_PAGES if page in times
              and max(times[page]["first_ms"], times[page]["p95_ms"]) > TARGET_MS]
    return {"target_ms": TARGET_MS, "met": not missed, "missed": missed}


def _one(url: str, images: int, repeats: int) -> dict:
    start = time.perf_counter()
    built = build(url, images)
    built_s = time.perf_counter() - start
    load = os.getloadavg()[0]
    times = measure(url, built, repeats)
    return {"build_s": built_s, "rows": images * len(METHODS) * len(SIGMAS), "load_before": load,
            "load_after": os.getloadavg()[0], "pages": times, **verdict(times)}
