"""The ``train`` kind: train a denoiser (against frozen classifiers) or a classifier, store its checkpoint."""

from __future__ import annotations

import tempfile
from pathlib import Path

from sqlalchemy.orm import Session

from dsq import artifacts, checkpoints, datasets, references, smoothing, specs, training
from dsq.db import repo
from dsq.db.session import session_scope
from dsq.errors import JobCancelled
from dsq.kinds import Kind, on_gpu
from dsq.settings import Settings
from dsq.specs import TrainSpec


def check(session: Session, spec: TrainSpec, settings: Settings) -> int:
    """Data, architecture and store are usable, and the models that exist now fit the data; work = epochs."""
    root = spec.data_root or settings.data_root
    x = datasets.get_dataset(spec.dataset, "train", root=root)[0][0]
    artifacts.store_for(settings).check()  # fail now, not after training, if the checkpoint cannot be stored
    training.build_model(spec, datasets.dataset_info(spec.dataset, root=root))
    for reference in spec.classifiers:
        if references.available(session, reference):
            model = checkpoints.load_checkpoint(references.resolve(session, reference, settings))[0]
            smoothing.check_image(model, x)
    if spec.init and references.available(session, spec.init):
        checkpoints.load_checkpoint(references.resolve(session, spec.init, settings))
    return spec.epochs


def demand(spec: TrainSpec, cluster: dict) -> dict:
    """One trainer actor: a GPU, or one CPU."""
    return {"GPU": 1.0} if on_gpu(cluster) else {"CPU": 1.0}


def run_training(engine, settings: Settings, job_id: int, device: str) -> dict:
    """Train what a train job describes, store its checkpoint and artifact row; return metrics."""
    with session_scope(engine) as session:
        spec = specs.from_dict(repo.get_job(session, job_id).spec)
        paths = {r: references.resolve(session, r, settings) for r in spec.references()}
    root = spec.data_root or settings.data_root
    info = datasets.dataset_info(spec.dataset, root=root)
    train_set = datasets.get_dataset(spec.dataset, "train", root=root)
    test_set = datasets.get_dataset(spec.dataset, "test", root=root)
    frozen = [checkpoints.load_checkpoint(paths[r], device=device)[0] for r in spec.classifiers]
    init = checkpoints.load_checkpoint(paths[spec.init], device=device)[0] if spec.init else None

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
