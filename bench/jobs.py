"""The benchmark's certification jobs through the real job system (local Ray, temporary SQLite), timed.

``bench.run`` takes ``ray_jobs`` as an argument (the CLI passes this one), so the in-process trials and their
child processes load neither Ray nor the job system.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from dsq.kinds.certify import CertifySpec

from bench.config import MIN_TIMED_WINDOW_S, BenchConfig, Log, Pair
from bench.rayjobs import save_pair, steady_rate, write_synthetic_cifar10
from bench.trials import Trial


def ray_jobs(cfg: BenchConfig, pair: Pair, control: Trial, log: Log) -> dict:
    """Certify jobs with 1 worker and with K workers on a local Ray of ``threads`` CPUs.

    ``control`` (the in-process loop, same threads) runs twice just before and twice just after
    each job, so a job is also compared with the in-process speed under the same machine load.
    """
    import ray

    from workers import resources

    started_ray = not ray.is_initialized()
    resources.connect(None, num_cpus=cfg.threads)
    try:
        with tempfile.TemporaryDirectory(prefix="dsq-bench-") as tmp:
            out = {}
            for workers in sorted({1, cfg.workers}):
                before = [control(cfg.samples) for _ in range(2)]
                job = _one_job(cfg, pair, Path(tmp), workers, log)
                job["in_process_control_samples_per_s"] = float(np.mean(before + [control(cfg.samples)
                                                                                 for _ in range(2)]))
                out[f"workers_{workers}"] = job
            return out
    finally:
        if started_ray:
            ray.shutdown()


def _one_job(cfg: BenchConfig, pair: Pair, tmp: Path, workers: int, log: Log) -> dict:
    from dsq import jobs
    from dsq.db.session import open_database, session_scope
    from dsq.settings import Settings
    from workers import runner
    from workers.loop import Control

    home = tmp / f"home-{workers}"
    settings = Settings(database_url=f"sqlite:///{home / 'bench.db'}", home=home, data_root=str(tmp / "data"))
    home.mkdir(parents=True)
    if pair.dataset == "cifar10":
        write_synthetic_cifar10(tmp / "data" / "cifar10", cfg.ray_images, cfg.seed)
    classifier, denoiser = save_pair(pair, cfg.seed, home)
    spec = CertifySpec(dataset=pair.dataset, classifier=classifier, denoiser=denoiser, sigma=cfg.sigma,
                             n0=cfg.ray_n0, n=cfg.ray_n, batch_size=cfg.batch_size, max_images=cfg.ray_images,
                             seed=cfg.seed, workers=workers,
                             data_root=str(tmp / "data" / "cifar10") if pair.dataset == "cifar10" else None)
    engine = open_database(settings.database_url)
    with session_scope(engine) as session:
        job_id = jobs.submit(session, spec, settings).id
    engine.dispose()
    finished: list[float] = []
    started = time.perf_counter()
    status = runner.run_job(settings, job_id, Control(on_progress=lambda done, total: finished.append(time.perf_counter())))
    wall = time.perf_counter() - started
    per_image = cfg.ray_n0 + cfg.ray_n
    steady = steady_rate(finished, per_image)
    window = finished[-2] - finished[0] if len(finished) >= 3 else 0.0
    result = {"status": status, "workers": workers, "threads_per_worker": max(1, cfg.threads // workers),
              "images": len(finished), "samples_per_image": per_image, "wall_s": wall,
              "first_image_s": finished[0] - started if finished else float("nan"),
              "samples_per_s": steady, "timed_window_s": window,
              "samples_per_s_with_startup": len(finished) * per_image / wall}
    log(f"  ray job, {workers} worker(s): {status}, {steady:.0f} samples/s after the first image "
        f"({result['samples_per_s_with_startup']:.0f}/s with start-up, {wall:.0f} s)")
    if window < MIN_TIMED_WINDOW_S:
        log(f"  warning: only {window:.1f} s between the first and the second-to-last image; "
            f"use more images (--ray-images) or samples (--ray-n) for a meaningful rate")
    return result
