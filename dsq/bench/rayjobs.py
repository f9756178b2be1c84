"""Certification jobs through the real job system (local Ray, temporary SQLite), timed."""

from __future__ import annotations

import pickle
import tempfile
import time
from pathlib import Path

import numpy as np

from dsq import checkpoints
from dsq.bench.config import MIN_TIMED_WINDOW_S, BenchConfig, Log, Pair
from dsq.bench.trials import Trial, build_pair


def write_synthetic_cifar10(root: Path, images: int, seed: int = 0) -> None:
    """Random images in CIFAR-10's python-pickle layout (the reader needs every batch file)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, count in [(f"data_batch_{i}", 1) for i in range(1, 6)] + [("test_batch", images)]:
        batch = {"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
                 "labels": [int(v) for v in rng.integers(0, 10, count)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class{i}" for i in range(10)]}))


def _save_pair(pair: Pair, seed: int, folder: Path) -> tuple[str, str]:
    denoiser, classifier = build_pair(pair, seed)
    channels = pair.shape[0]
    paths = folder / "classifier.pt", folder / "denoiser.pt"
    checkpoints.save_checkpoint(paths[0], kind="classifier", arch=pair.classifier,
                                arch_kwargs={"num_classes": pair.num_classes, "in_channels": channels,
                                             **pair.classifier_kwargs},
                                model=classifier, normalization=None, training_spec={}, metrics={})
    checkpoints.save_checkpoint(paths[1], kind="denoiser", arch=pair.denoiser["arch"],
                                arch_kwargs={"in_channels": channels,
                                             **{k: v for k, v in pair.denoiser.items() if k != "arch"}},
                                model=denoiser, normalization=None, training_spec={}, metrics={})
    return str(paths[0]), str(paths[1])


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
    from dsq import jobs, specs
    from dsq.db.session import open_database, session_scope
    from dsq.settings import Settings
    from workers import runner
    from workers.loop import Control

    home = tmp / f"home-{workers}"
    settings = Settings(database_url=f"sqlite:///{home / 'bench.db'}", home=home, data_root=str(tmp / "data"))
    home.mkdir(parents=True)
    if pair.dataset == "cifar10":
        write_synthetic_cifar10(tmp / "data" / "cifar10", cfg.ray_images, cfg.seed)
    classifier, denoiser = _save_pair(pair, cfg.seed, home)
    spec = specs.CertifySpec(dataset=pair.dataset, classifier=classifier, denoiser=denoiser, sigma=cfg.sigma,
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


def steady_rate(finished: list[float], per_image: int) -> float:
    """Samples/s between the first and the second-to-last finished image.

    Right after an image finishes, the next ones may already be partly sampled (several shards
    are in flight); that state is alike after any image but the last, which drains the pipeline,
    so timing from image 1 to image N-1 neither counts start-up nor in-flight work twice.
    """
    if len(finished) < 3:
        return float("nan")
    return (len(finished) - 2) * per_image / (finished[-2] - finished[0])
