"""``dsq bench --sequential``: sequential against fixed-n certification on the digits demo's models.

The models are the digits preset's (``experiments/digits.toml``): f and, per sigma, the STAB+MSE white-box
denoiser and Cohen et al.'s Gaussian-trained classifier. They are trained as jobs of the queue by a
worker in this process, as ``dsq demo`` does, in ``home`` (a temporary folder unless one is given;
models a previous run trained there are reused). Each test digit is then sampled once per method and
sigma, as Ray tasks of ``CHUNK`` images on single-threaded workers running f o D as the sampler actors
do, and ``bench.sequential`` derives the three answers from the votes of each batch.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import ray

from bench import sequential as rules
from dsq import demo, experiments, pipeline, references
from dsq.db import repo
from dsq.db.session import open_database, session_scope
from dsq.errors import DsqError
from dsq.kinds.certify_api import ApiCertifySpec
from dsq.settings import Settings

# Labels of the preset's [[methods]]: a trained denoiser, Gaussian training, and the DDPM's one-shot denoiser.
METHODS = ("STAB+MSE white-box", "Cohen et al. (Gaussian training)", "diffusion (one-shot)")
EXPERIMENT = "sequential-bench"  # a name no preset uses: a rerun in the same home reuses only this benchmark's models
CHUNK = 25  # images per Ray task: 25 x 10,100 samples is a few seconds, small enough to spread over the CPUs


def measure(images: int, home: str | None = None, log=print, methods: tuple[str, ...] = METHODS) -> dict:
    """Train (or reuse) the models, sample ``images`` test digits per method and sigma, compare the rules."""
    from workers import resources

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dsq-sequential-") as tmp:
        root = Path(home or tmp)
        root.mkdir(parents=True, exist_ok=True)
        settings = Settings(database_url=f"sqlite:///{root / 'dsq.db'}", home=root)
        was_running = ray.is_initialized()
        resources.connect(None)
        try:
            models = train(settings, log, methods)
            trained = time.perf_counter()
            votes = sample(models, images, log)
        finally:
            if not was_running:
                ray.shutdown()
    rows = [{"method": method, "sigma": sigma, "radius": radius, **rules.compare(found, sigma, radius)}
            for (method, sigma), found in votes.items() for radius in rules.RADII]
    return {"images": images, "max_n": rules.MAX_N, "batch": rules.BATCH, "alpha": rules.ALPHA,
            "training_s": trained - started, "sampling_s": time.perf_counter() - trained, "rows": rows}


def train(settings: Settings, log, labels: tuple[str, ...] = METHODS) -> dict[tuple[str, float], tuple[str, str | None]]:
    """Checkpoint paths (classifier, denoiser) per (method, sigma), training what ``settings.home`` lacks."""
    from workers import worker

    plan = experiments.load(demo.PRESET)
    methods = [step for step in plan.steps if step.meta.get("method") in labels and step.meta["sigma"] in rules.SIGMAS]
    if not methods:
        raise DsqError(f"no method of the digits preset is labelled {' or '.join(map(repr, labels))}")
    models = [step for step in plan.steps if step.key in _needed(plan, methods)]
    engine = open_database(settings.database_url)
    with session_scope(engine) as session:
        done = {job.name: job.id for job in repo.list_jobs(session, limit=1000, kind="train", experiment=EXPERIMENT,
                                                           status="succeeded")}
    if all(step.spec.name in done for step in models):
        ids = {step.key: done[step.spec.name] for step in models}
        log(f"reusing {len(ids)} trained models in {settings.home}")
    else:
        with session_scope(engine) as session:
            ids = experiments.submit(session, experiments.Plan(EXPERIMENT, models), settings, experiment=EXPERIMENT)
        log(f"training {len(ids)} models (jobs {min(ids.values())}-{max(ids.values())}) in {settings.home}")
        summary = worker.QueueWorker(settings, drain=True, only=set(ids.values()), log=log).run()
        failed = {job: status for job, status in summary.ran.items() if status != "succeeded"}
        if failed:
            raise DsqError(f"training jobs did not succeed: {failed}; see their logs in {settings.home}")
    with session_scope(engine) as session:
        paths = {(step.meta["method"], step.meta["sigma"]): _paths(session, experiments.resolve(step.spec, ids),
                                                                   settings) for step in methods}
    engine.dispose()
    return paths


def _needed(plan: experiments.Plan, steps: list) -> set[str]:
    """The keys of every step the given steps need, transitively."""
    by_key, needed, todo = {step.key: step for step in plan.steps}, set(), [k for s in steps for k in s.needs]
    while todo:
        key = todo.pop()
        if key not in needed:
            needed.add(key)
            todo += by_key[key].needs
    return needed


def _paths(session, spec, settings: Settings) -> tuple[str, str | None]:
    denoiser = references.resolve(session, spec.denoiser, settings) if spec.denoiser else None
    return references.resolve(session, spec.classifier, settings), denoiser


def sample(models: dict, images: int, log) -> dict[tuple[str, float], list[rules.ImageVotes]]:
    """Every image's votes per batch, per (method, sigma), as Ray tasks of CHUNK images."""
    from dsq import datasets

    indices = datasets.test_subset(datasets.get_dataset("digits", "test"), skip=1, max=images)
    chunks = [indices[i:i + CHUNK] for i in range(0, len(indices), CHUNK)]
    tasks = {key: [_sample_chunk.remote(*paths, key[1], chunk) for chunk in chunks] for key, paths in models.items()}
    votes = {}
    for (method, sigma), refs in tasks.items():
        votes[(method, sigma)] = [image for chunk in ray.get(refs) for image in chunk]
        log(f"sampled {len(votes[(method, sigma)])} digits x {rules.N0 + rules.MAX_N:,} samples: "
            f"{method}, sigma {sigma:g}")
    return votes


@ray.remote(num_cpus=1)
def _sample_chunk(classifier: str, denoiser: str | None, sigma: float, indices: list[int]) -> list[rules.ImageVotes]:
    """n0 selection samples and MAX_N estimation samples per image, keeping the votes for cA of each batch."""
    import torch

    from dsq import datasets, fastpath, sampling

    torch.set_num_threads(1)
    model = fastpath.prepare_for_inference(pipeline.load(classifier, denoiser, "cpu", sigma=sigma), device="cpu")
    test_set = datasets.get_dataset("digits", "test")
    found = []
    for index in indices:
        x, label = test_set[index]
        common = dict(sigma=sigma, batch_size=rules.BATCH, seed=rules.SEED, image=index, device="cpu")
        c_a = int(np.argmax(sampling.sample_phase(model, x, num=rules.N0, phase=sampling.SELECTION, **common)))
        successes = tuple(int(sampling.sample_counts(model, x, start=start, count=rules.BATCH,
                                                     phase=sampling.ESTIMATION, **common)[c_a])
                          for start in range(0, rules.MAX_N, rules.BATCH))
        found.append(rules.ImageVotes(int(label), c_a, successes))
    return found


def api_measure(images: int, n0: int, max_n: int, sigma: float, multiples: tuple[float, ...], log=print) -> list[dict]:
    """Billed queries per image of sequential certify-api jobs at radius k * sigma, against n0 + max_n + 1.

    Jobs on the embedded emulator (its digits logistic regression is the API; no denoiser), in a
    temporary home, largest radius first. Each row counts the queries each image needed (n0 + n + 1,
    what a job pays when no answer is stored yet); later jobs reuse the earlier ones' stored answers,
    so they are fast, but the count is what each would pay alone.
    """
    from dsq import jobs
    from workers import resources, runner

    resources.connect(None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dsq-sequential-api-") as tmp:
        settings = Settings(database_url=f"sqlite:///{Path(tmp) / 'dsq.db'}", home=Path(tmp))
        engine = open_database(settings.database_url)
        for k in sorted(multiples, reverse=True):
            spec = ApiCertifySpec(provider="google", sigma=sigma, dataset="digits", max_images=images, n0=n0, n=max_n,
                                  radius=k * sigma, endpoint="embedded", qps=2000.0, burst=200, concurrency=16)
            with session_scope(engine) as session:
                job_id = jobs.submit(session, spec, settings).id
            started = time.perf_counter()
            status = runner.run_job(settings, job_id)
            with session_scope(engine) as session:
                found = repo.results_for_job(session, job_id)
            queries = np.array([row.n0 + row.n + 1 for row in found], dtype=float)
            rows.append({"radius_over_sigma": k, "radius": k * sigma, "status": status, "images": len(found),
                         "certified": float(np.mean([row.correct and row.prediction != -1 for row in found])),
                         "mean_queries": float(queries.mean()), "median_queries": float(np.median(queries)),
                         "fixed_queries": n0 + max_n + 1, "seconds": time.perf_counter() - started})
            log(f"certify-api at r = {k:g} sigma: {status}, mean {queries.mean():.0f} queries per image "
                f"against {n0 + max_n + 1}")
        engine.dispose()
    return rows
