"""Model references: what ``--classifier``, ``--denoiser``, ``--surrogate`` and ``--init`` name.

A reference is a checkpoint file path or ``job:ID``, the checkpoint a training job produces.
A ``job:ID`` makes the job that names it depend on job ID: it is checked at submit (the job
exists, trains a model of the right role, has not failed), and resolved to a file only when the
dependent job runs, by then ID has succeeded.
"""

from __future__ import annotations

import re
from pathlib import Path

from sqlalchemy.orm import Session

from dsq import artifacts
from dsq.db import repo
from dsq.errors import CheckpointError, InvalidArgument, JobNotFound
from dsq.settings import Settings

JOB_REFERENCE = re.compile(r"^job:(\d+)$")
DEAD = ("failed", "cancelled")


def job_id(reference: str) -> int | None:
    """N for ``job:N``, None for a file path."""
    match = JOB_REFERENCE.match(reference)
    return int(match.group(1)) if match else None


def is_job_reference(reference: str) -> bool:
    return job_id(reference) is not None


def check(session: Session, reference: str, role: str) -> int | None:
    """Check a reference at submit; return the job it depends on (None for a file).

    ``role`` is ``classifier`` or ``denoiser``: a ``job:N`` must train that kind of model.
    """
    number = job_id(reference)
    if number is None:
        if not Path(reference).is_file():
            raise CheckpointError(f"checkpoint not found: {reference}")
        return None
    try:
        job = repo.get_job(session, number)
    except JobNotFound:
        raise InvalidArgument(f"{reference}: no job with id {number}") from None
    if job.kind != "train":
        raise InvalidArgument(f"{reference} is a {job.kind} job: it produces no model (a {role} must come "
                              "from a train job or a checkpoint file)")
    target = (job.spec or {}).get("target")
    if target != role:
        raise InvalidArgument(f"{reference} trains a {target}, not a {role}")
    if job.status in DEAD:
        raise InvalidArgument(f"{reference} has {job.status}: it will never produce a {role} "
                              f"(resume it first: dsq resume {number})")
    return number


def available(session: Session, reference: str) -> bool:
    """Whether the checkpoint exists now (a file, or a job that succeeded)."""
    number = job_id(reference)
    return number is None or repo.get_job(session, number).status == "succeeded"


def checkpoint_source(session: Session, reference: str) -> tuple[str, str | None]:
    """Where a reference's checkpoint lives: (store location, sha256) for ``job:ID``, (path, None) for a file."""
    number = job_id(reference)
    if number is None:
        if not Path(reference).is_file():
            raise CheckpointError(f"checkpoint not found: {reference}")
        return reference, None
    job = repo.get_job(session, number)
    found = repo.artifacts_for_job(session, job.id)
    if job.status != "succeeded" or not found:
        raise CheckpointError(f"{reference} has no checkpoint: the job is {job.status}, not a succeeded training job")
    return found[0].location, found[0].sha256


def local_checkpoint(settings: Settings, source: tuple[str, str | None]) -> str:
    """A local file for a checkpoint source: fetched from the store (cached) and its sha256 checked."""
    location, sha256 = source
    return location if sha256 is None else str(artifacts.fetch(settings, location, sha256))


def resolve(session: Session, reference: str, settings: Settings) -> str:
    """The local checkpoint file a model reference names."""
    return local_checkpoint(settings, checkpoint_source(session, reference))


def trained_classes(session: Session, reference: str, settings: Settings) -> int | None:
    """The classes of the classifier a pending train job ``job:N`` will produce (those of its dataset)."""
    from dsq import datasets  # torch: only when a job is checked

    number = job_id(reference)
    if number is None:
        return None
    spec = repo.get_job(session, number).spec or {}
    if spec.get("target") != "classifier" or "dataset" not in spec:
        return None
    root = spec.get("data_root") or settings.data_root
    return datasets.dataset_info(spec["dataset"], root=root).num_classes
