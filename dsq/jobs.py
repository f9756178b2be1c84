"""Job lifecycle: submit, cancel, resume checks, and the work a job does.

Functions here take a Session (the caller owns the transaction) or an Engine
(when they run a whole job and commit as they go). Ray lives in ``workers/``:
the actors there call ``run_training`` and ``record_certificate``.
"""

from __future__ import annotations

import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import torch
from sqlalchemy.orm import Session

from dsq import artifacts, checkpoints, datasets, report, smoothing, specs, training
from dsq.db import repo
from dsq.db.session import session_scope
from dsq.errors import CheckpointError, JobCancelled, JobStateError
from dsq.settings import Settings
from dsq.smoothing import Certificate

FINISHED = ("succeeded", "failed", "cancelled")
STALE_AFTER = timedelta(seconds=60)


def checkpoint_source(session: Session, reference: str) -> tuple[str, str | None]:
    """Where a model reference's checkpoint lives: (store location, sha256) for ``job:ID``, (path, None) for a file."""
    if specs.is_job_reference(reference):
        job = repo.get_job(session, int(reference.split(":")[1]))
        found = repo.artifacts_for_job(session, job.id)
        if job.status != "succeeded" or not found:
            raise CheckpointError(f"{reference} has no checkpoint: the job is {job.status}, not a succeeded training job")
        return found[0].location, found[0].sha256
    if not Path(reference).is_file():
        raise CheckpointError(f"checkpoint not found: {reference}")
    return reference, None


def local_checkpoint(settings: Settings, source: tuple[str, str | None]) -> str:
    """A local file for a checkpoint source: fetched from the store (cached) and its sha256 checked."""
    location, sha256 = source
    return location if sha256 is None else str(artifacts.fetch(settings, location, sha256))


def resolve_reference(session: Session, reference: str, settings: Settings) -> str:
    """The local checkpoint file a model reference names: ``job:ID`` or a path."""
    return local_checkpoint(settings, checkpoint_source(session, reference))


def check_spec(session: Session, spec, settings: Settings) -> int:
    """Check that a spec can run (models load and match, data is there); return its work total."""
    if spec.kind == "certify_api":
        from dsq.apis import jobs as api_jobs

        return api_jobs.check_spec(session, spec, settings)
    paths = {r: resolve_reference(session, r, settings) for r in spec.references()}
    models = {r: checkpoints.load_checkpoint(p)[0] for r, p in paths.items()}
    root = spec.data_root or settings.data_root
    dataset = datasets.get_dataset(spec.dataset, spec.split if spec.kind == "certify" else "train", root=root)
    x = dataset[0][0]
    if spec.kind == "train":
        artifacts.store_for(settings).check()  # fail now, not after training, if the checkpoint cannot be stored
        training.build_model(spec, datasets.dataset_info(spec.dataset, root=root))  # architecture and arguments
        for reference in spec.classifiers:
            smoothing.check_image(models[reference], x)
        return spec.epochs
    pipeline = models[spec.classifier]
    if spec.denoiser:
        pipeline = torch.nn.Sequential(models[spec.denoiser], pipeline)
    smoothing.check_image(pipeline, x)
    return len(image_plan(spec, dataset))


def submit(session: Session, spec, settings: Settings):
    """Validate a spec against the database and the disk, then queue it as a job."""
    total = check_spec(session, spec, settings)
    job = repo.create_job(session, kind=spec.kind, spec=spec.to_dict(), seed=spec.seed, name=spec.name, total=total)
    repo.add_log(session, job.id, f"submitted {spec.kind} job ({total} work items)")
    return job


def cancel(session: Session, job_id: int):
    """Ask a job to stop; a queued job is cancelled at once."""
    job = repo.request_cancel(session, job_id)
    if job.status == "queued":
        repo.mark_finished(session, job_id, "cancelled")
    repo.add_log(session, job_id, "cancel requested")
    return job


def check_resumable(session: Session, job_id: int, now: datetime | None = None):
    """A job can resume unless it succeeded or its runner is still alive (fresh heartbeat)."""
    job = repo.get_job(session, job_id)
    now = now or datetime.now(timezone.utc)
    if job.status == "succeeded":
        raise JobStateError(f"job {job_id} already succeeded; nothing to resume")
    beat = job.heartbeat_at or job.started_at
    if job.status == "running" and beat is not None and now - beat < STALE_AFTER:
        age = (now - beat).total_seconds()
        raise JobStateError(f"job {job_id} is running (last heartbeat {age:.0f} s ago); cancel it first")
    return job


def reopen(session: Session, job_id: int) -> None:
    """Put a job that will be resumed back in the queue."""
    repo.mark_queued(session, job_id)
    repo.add_log(session, job_id, "resumed")


def load_spec(session: Session, job_id: int):
    return specs.from_dict(repo.get_job(session, job_id).spec)


def image_plan(spec: specs.CertifySpec, dataset) -> list[int]:
    """The dataset indices a certify job covers, in order (every skip-th, at most max)."""
    return datasets.test_subset(dataset, skip=spec.skip, max=spec.max_images)


def check_cancel(engine, job_id: int) -> None:
    with session_scope(engine) as session:
        if repo.is_cancel_requested(session, job_id):
            raise JobCancelled(f"job {job_id} was cancelled")
        repo.heartbeat(session, job_id)


def load_pipeline(classifier_path: str, denoiser_path: str | None, device) -> torch.nn.Module:
    """f o D (or f alone), in eval mode on ``device``."""
    classifier, _ = checkpoints.load_checkpoint(classifier_path, device=device)
    if denoiser_path is None:
        return classifier.eval()
    denoiser, _ = checkpoints.load_checkpoint(denoiser_path, device=device)
    return torch.nn.Sequential(denoiser, classifier).eval()


def record_certificate(session: Session, job_id: int, image_index: int, label: int, cert: Certificate,
                       *, seconds: float, worker: str | None, device: str | None, model: dict | None = None) -> None:
    """Upsert one image's result and mark its work unit done (idempotent).

    ``model`` is how the sampler ran f o D (``PreparedModel.describe()``: precision...), kept in ``extra``.
    """
    repo.upsert_result(
        session, job_id, image_index, label=label, prediction=cert.prediction, radius=cert.radius,
        correct=cert.prediction == label, p_lower=cert.p_lower,
        counts_selection=[int(c) for c in cert.counts_selection],
        counts_estimation=[int(c) for c in cert.counts_estimation],
        n0=cert.n0, n=cert.n, alpha=cert.alpha, sigma=cert.sigma, seconds=seconds, worker=worker, device=device,
        extra={"model": model} if model else None)
    repo.upsert_work_unit(session, job_id, f"image:{image_index}", status="done", worker=worker)


def run_training(engine, settings: Settings, job_id: int, device: str) -> dict:
    """Train what a train job describes, store its checkpoint and artifact row; return metrics."""
    with session_scope(engine) as session:
        spec = load_spec(session, job_id)
        references = {r: resolve_reference(session, r, settings) for r in spec.references()}
    root = spec.data_root or settings.data_root
    info = datasets.dataset_info(spec.dataset, root=root)
    train_set = datasets.get_dataset(spec.dataset, "train", root=root)
    test_set = datasets.get_dataset(spec.dataset, "test", root=root)
    frozen = [checkpoints.load_checkpoint(references[r], device=device)[0] for r in spec.classifiers]
    init = checkpoints.load_checkpoint(references[spec.init], device=device)[0] if spec.init else None

    def on_progress(done, total, metrics):
        with session_scope(engine) as session:
            if repo.is_cancel_requested(session, job_id):
                raise JobCancelled(f"job {job_id} was cancelled")
            repo.set_progress(session, job_id, done, total)
            repo.add_log(session, job_id, f"epoch {done}/{total} loss {metrics['loss']:.4f}")

    model, metrics = training.train(spec, train_set, test_set, info, classifiers=frozen, init=init,
                                    device=device, on_progress=on_progress)
    save_model(engine, settings, job_id, spec, info, model, metrics)
    return metrics


def save_model(engine, settings: Settings, job_id: int, spec, info, model, metrics) -> None:
    """Write the checkpoint, put it in the artifact store, record its location and sha256."""
    name = spec.name or f"{spec.target}-{spec.arch}-{spec.objective}"
    arch_kwargs = dict(spec.arch_kwargs)
    if spec.target == "denoiser":
        arch_kwargs.setdefault("in_channels", info.channels)
    else:
        arch_kwargs.update(num_classes=info.num_classes, in_channels=info.channels)
    normalization = {"mean": list(info.mean), "std": list(info.std)} if spec.target == "classifier" else None
    with tempfile.TemporaryDirectory(prefix=f"dsq-job-{job_id}-") as scratch:
        path = Path(scratch) / "model.pt"
        checkpoints.save_checkpoint(path, kind=spec.target, arch=spec.arch, arch_kwargs=arch_kwargs,
                                    model=model.cpu(), normalization=normalization,
                                    training_spec=spec.to_dict(), metrics=metrics)
        location, sha256 = artifacts.store_for(settings).put(path)
    with session_scope(engine) as session:
        repo.upsert_artifact(session, job_id=job_id, name=name, kind=spec.target, location=location,
                             sha256=sha256, spec=spec.to_dict(), metrics=metrics)
        repo.add_log(session, job_id, f"saved {location} (sha256 {sha256[:12]})")


def describe(job, now: datetime) -> list[str]:
    """Lines for ``dsq status``: state, progress, rate and ETA."""
    lines = [f"job {job.id} ({job.kind}{', ' + job.name if job.name else ''}): {job.status}",
             f"progress {job.progress_done}/{job.progress_total}, attempts {job.attempts}"]
    if job.started_at and job.progress_done:
        elapsed = ((job.finished_at or now) - job.started_at).total_seconds()
        rate = job.progress_done / max(elapsed, 1e-9)
        lines.append(f"rate {rate:.2f} items/s over {elapsed:.0f} s")
        if job.status == "running" and rate > 0:
            lines.append(f"eta {(job.progress_total - job.progress_done) / rate:.0f} s")
    if job.error:
        lines.append(f"error: {job.error}")
    return lines


def labelled_results(session: Session, job_ids) -> list[tuple[str, list]]:
    """(label, per-image results) for each job, label = its name or ``job N``."""
    labelled = []
    for job_id in job_ids:
        job = repo.get_job(session, job_id)
        rows = report.as_results(repo.results_for_job(session, job_id))
        if not rows:
            raise JobStateError(f"job {job_id} has no results yet (status {job.status})")
        precision = (job.spec or {}).get("precision", "fp32")  # reduced precision changes f: say so
        label = job.name or f"job {job.id}"
        labelled.append((label if precision == "fp32" else f"{label} ({precision})", rows))
    return labelled


def comparison(labelled, radii, *, envelope: bool = False, title: str = "certified accuracy % (clean)"):
    """A rich table: a row per job and, optionally, the envelope across them."""
    rows = report.compare_table(labelled, radii)
    if envelope:
        rows.append(report.envelope_row(labelled, radii))
    return report.render_table(report.compare_header(radii), rows, title=title)
