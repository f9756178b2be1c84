"""Model references: what ``--classifier``, ``--denoiser``, ``--surrogate`` and ``--init`` name.

A reference is ``job:ID`` (the checkpoint a training job produces), a checkpoint or TorchScript
file, ``torchvision:NAME`` or ``package.module:function`` (``dsq.usermodels``: the last three with
their options, a spec's ``models[reference]``). A ``job:ID`` makes the job that names it depend on
job ID: it is checked at submit (the job exists, trains a model of the right role, has not
failed), and resolved to a file only when the dependent job runs, by then ID has succeeded.
"""

from __future__ import annotations

import re
from pathlib import Path

from sqlalchemy.orm import Session

from dsq import artifacts, usermodels
from dsq import uploads as dsq_uploads
from dsq.db import repo
from dsq.db.models import ENDED_BADLY
from dsq.errors import CheckpointError, InvalidArgument, JobNotFound
from dsq.settings import Settings

JOB_REFERENCE = re.compile(r"^job:(\d+)$")
DEAD = ENDED_BADLY  # a job that will never produce its model unless resumed


def job_id(reference: str) -> int | None:
    """N for ``job:N``, None for a file path."""
    match = JOB_REFERENCE.match(reference)
    return int(match.group(1)) if match else None


def is_job_reference(reference: str) -> bool:
    return job_id(reference) is not None


def check(session: Session, reference: str, role: str, options: dict | None = None) -> int | None:
    """Check a reference at submit; return the job it depends on (None for a file or the user's own model).

    ``role`` is ``classifier`` or ``denoiser``: a ``job:N`` must train that kind of model. The files a
    user's model names must exist, and a checkpoint file (which carries its normalization) takes no options.
    """
    number = job_id(reference)
    if number is None:
        kind = usermodels.form(reference)
        if kind == "diffusers":
            from dsq import diffusion  # torch: a diffusers folder is checked for its parts at submit

            diffusion.diffusers_parts(reference[len(usermodels.DIFFUSERS):])
        for path in ([reference] if kind == "file" else []) + [(options or {}).get("weights")]:
            if path and not Path(path).is_file():
                raise CheckpointError(f"{'weights file' if path != reference else 'checkpoint'} not found: {path}")
        given = {key: value for key, value in (options or {}).items() if key != "files" and value}
        if kind == "file" and given and not usermodels.is_torchscript(reference):
            raise InvalidArgument(f"{reference} is a checkpoint: it carries its architecture, weights and "
                                  "normalization; --*-weights, --*-args, --mean and --std are for TorchScript, "
                                  "torchvision:NAME and package.module:function models")
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


def source(session: Session, reference: str, options: dict | None = None, sigma: float | None = None,
           uploads: dict | None = None) -> dict:
    """What a process needs to load the model a reference names (plain data: it travels to Ray actors).

    A denoiser's source carries the job's ``sigma``: a diffusion model denoises at the step that σ chooses.
    ``uploads``: the job's (``spec.uploads``); the model's file and weights are then read from the store where
    the model is loaded, not from the paths given at submit.
    """
    carried = dsq_uploads.model_uploads(uploads, reference, options)
    if reference in carried:
        location, sha256 = reference, None  # replaced by its local copy where it is loaded
    else:
        location, sha256 = (checkpoint_source(session, reference)
                            if usermodels.form(reference) in ("job", "file") else (None, None))
    found = {"reference": reference, "location": location, "sha256": sha256, "options": options or {}}
    found = {**found, "uploads": carried} if carried else found
    return found if sigma is None else {**found, "sigma": sigma}


def file_source(path: str) -> dict:
    """The source of a model file (a checkpoint or TorchScript file), without options."""
    return {"reference": path, "location": path, "sha256": None, "options": {}}


def load_source(settings: Settings, found: dict, role: str, device="cpu"):
    """The model of a ``source``, in eval mode on ``device`` (a stored checkpoint is fetched and hash-checked).

    A diffusion model (``dsq.diffusion``) is returned as the one-shot denoiser at the source's σ.
    """
    from dsq import checkpoints, diffusion  # torch: only where models are loaded

    found = dsq_uploads.local_source(settings, found)
    path = local_checkpoint(settings, (found["location"], found["sha256"])) if found["location"] else None
    usermodels.verify(found["options"])
    if usermodels.form(found["reference"]) == "diffusers":
        model = diffusion.load_diffusers(found["reference"][len(usermodels.DIFFUSERS):], device)
    elif path is None or usermodels.is_torchscript(path):
        model = usermodels.load(found["reference"], path, found["options"], role, device)
    else:
        model = checkpoints.load_model(path, device=device)
    if not isinstance(model, diffusion.DiffusionModel):
        return model
    if role != "denoiser" or found.get("sigma") is None:
        raise InvalidArgument(f"{found['reference']} is a diffusion model: it serves as the denoiser of a "
                              f"certification (at its σ), not as a {role}")
    return model.denoiser(found["sigma"])


def load(session: Session, reference: str, settings: Settings, role: str, options: dict | None = None,
         device="cpu", sigma: float | None = None, uploads: dict | None = None):
    """The model a reference names, loaded now (a denoiser at ``sigma``)."""
    return load_source(settings, source(session, reference, options, sigma, uploads), role, device)


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
    return datasets.dataset_info(spec["dataset"], root=root, size=spec.get("size")).num_classes
