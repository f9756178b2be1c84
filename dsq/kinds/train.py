"""The ``train`` kind: train a denoiser (against frozen classifiers) or a classifier, store its checkpoint."""

from __future__ import annotations

import tempfile
from pathlib import Path

from sqlalchemy.orm import Session

from dsq import artifacts, checkpoints, datasets, references, smoothing, specs, training, usermodels
from dsq.db import repo
from dsq.db.session import session_scope
from dsq.errors import InvalidArgument, JobCancelled
from dsq.kinds import Kind, on_gpu
from dsq.settings import Settings
from dsq.specs import TrainSpec


def check(session: Session, spec: TrainSpec, settings: Settings) -> int:
    """Data, architecture and store are usable, and the models that exist now fit the data; work = epochs."""
    root = spec.data_root or settings.data_root
    classifiers = [references.load(session, reference, settings, "classifier", spec.models.get(reference))
                   for reference in spec.classifiers if references.available(session, reference)]
    info, train_set, _, _ = job_data(spec, root, classifiers)
    artifacts.store_for(settings).check()  # fail now, not after training, if the checkpoint cannot be stored
    training.build_model(spec, info)
    for model in classifiers:
        smoothing.check_image(model, train_set[0][0])
    if spec.init and not references.is_job_reference(spec.init) and usermodels.is_torchscript(spec.init):
        raise InvalidArgument(f"--init {spec.init} is a TorchScript file: fine-tuning needs a dsq checkpoint "
                              "(job:N or a file dsq wrote)")
    if spec.init and references.available(session, spec.init):
        checkpoints.load_checkpoint(references.resolve(session, spec.init, settings))
    return spec.epochs


def job_data(spec: TrainSpec, root: str | None, models: list):
    """``(info, train set, test set, notes)`` of a train job, its images converted to the channels its models take.

    Without models that say (a classifier trained from scratch), the test images' own channels. ``notes`` say
    what is converted; train images of another size than the test images are refused.
    """
    taken = sorted({c for c in map(smoothing.input_channels, models) if c is not None})
    if len(taken) > 1:
        raise InvalidArgument(f"the models of this job take images of different channels ({taken[0]} and "
                              f"{taken[1]}): they cannot be trained on the same images")
    info = datasets.dataset_info(spec.dataset, root=root, size=spec.size, channels=taken[0] if taken else None)
    sets = {split: datasets.get_dataset(spec.dataset, split, root=root, size=spec.size, channels=info.channels)
            for split in ("train", "test")}
    shape = tuple(sets["train"][0][0].shape)
    if shape != info.shape:
        raise InvalidArgument(f"the train images of {spec.dataset} are {shape[2]}x{shape[1]} but its test images "
                              f"{info.width}x{info.height}: pass --size N to resize both to NxN")
    notes = [datasets.channel_note(f"{spec.dataset} ({split})",
                                   datasets.image_channels(spec.dataset, split, root=root), info.channels)
             for split in sets]
    return info, sets["train"], sets["test"], [note for note in notes if note]


def demand(spec: TrainSpec, cluster: dict) -> dict:
    """One trainer actor: a GPU, or one CPU."""
    return {"GPU": 1.0} if on_gpu(cluster) else {"CPU": 1.0}


def run_training(engine, settings: Settings, job_id: int, device: str) -> dict:
    """Train what a train job describes, store its checkpoint and artifact row; return metrics."""
    with session_scope(engine) as session:
        spec = specs.from_dict(repo.get_job(session, job_id).spec)
        sources = {r: references.source(session, r, spec.models.get(r)) for r in spec.references()}
    frozen = [references.load_source(settings, sources[r], "classifier", device) for r in spec.classifiers]
    init = references.load_source(settings, sources[spec.init], spec.target, device) if spec.init else None
    info, train_set, test_set, notes = job_data(spec, spec.data_root or settings.data_root,
                                                frozen + ([init] if init is not None else []))
    if notes:  # images converted to the channels the job's models take: said in the job's log
        with session_scope(engine) as session:
            for note in notes:
                repo.add_log(session, job_id, note)

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


def save_model(engine, settings: Settings, job_id: int, spec: TrainSpec, info, model, metrics) -> None:
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


KIND = Kind(name="train", spec=TrainSpec, check=check, demand=demand, run="workers.train_loop:run")
