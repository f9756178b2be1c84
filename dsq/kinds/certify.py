"""The ``certify`` kind: certify the smoothed f o D on a deterministic subset of a dataset."""

from __future__ import annotations

import torch
from sqlalchemy.orm import Session

from dsq import datasets, references, sizing, smoothing, specs
from dsq.db import repo
from dsq.errors import InvalidArgument
from dsq.kinds import Kind, on_gpu
from dsq.settings import Settings
from dsq.smoothing import Certificate
from dsq.specs import CertifySpec


def check(session: Session, spec: CertifySpec, settings: Settings) -> int:
    """n can certify something, data is there and, when its models exist now, f o D takes its images; work = images."""
    specs.reach(spec)
    root = spec.data_root or settings.data_root
    dataset = datasets.get_dataset(spec.dataset, spec.split, root=root, size=spec.size)
    classes = datasets.dataset_info(spec.dataset, root=root, size=spec.size).num_classes
    if all(references.available(session, r) for r in spec.references()):
        models = [references.load(session, r, settings, role, spec.models.get(r)) for r, role in spec.model_roles()]
        dataset, _ = job_dataset(spec, root, model_channels(*models))
        outputs = takes_images(torch.nn.Sequential(*reversed(models)), dataset[0][0], spec)
    else:  # a classifier still to be trained will have the classes of its own dataset
        outputs = references.trained_classes(session, spec.classifier, settings)
    if outputs is not None and outputs != classes:
        raise InvalidArgument(f"the classifier has {outputs} outputs but dataset {spec.dataset} has {classes} "
                              "classes: its labels and the predictions would not match")
    return len(image_plan(spec, dataset))


def model_channels(classifier: torch.nn.Module, denoiser: torch.nn.Module | None = None) -> int | None:
    """The channels of the images f o D takes (D's, else f's); None when the models do not say."""
    taken = smoothing.input_channels(classifier)
    if denoiser is None:
        return taken
    denoised = smoothing.input_channels(denoiser)
    if denoised is not None and taken is not None and denoised != taken:
        raise InvalidArgument(f"the denoiser takes and returns {denoised}-channel images but the classifier takes "
                              f"{taken}-channel images: they cannot be chained")
    return taken if denoised is None else denoised


def job_dataset(spec: CertifySpec, root: str | None, channels: int | None):
    """``(dataset, note)``: the job's images with the ``channels`` f o D takes, and a line saying any conversion."""
    if channels not in (None, 1, 3):
        raise InvalidArgument(f"the model takes {channels}-channel images; dsq converts images to 1 (grayscale) or "
                              f"3 (RGB) channels only")
    own = datasets.image_channels(spec.dataset, spec.split, root=root)
    dataset = datasets.get_dataset(spec.dataset, spec.split, root=root, size=spec.size, channels=channels)
    return dataset, datasets.channel_note(spec.dataset, own, channels)


def takes_images(model: torch.nn.Module, x: torch.Tensor, spec: CertifySpec) -> int:
    """``smoothing.check_image``, its refusal naming the channels and size of the dataset's images."""
    try:
        return smoothing.check_image(model, x)
    except InvalidArgument as error:
        resizable = spec.size is None and (spec.dataset.startswith("folder") or spec.dataset == "imagenet")
        raise InvalidArgument(f"{error} (the images of {spec.dataset} are {x.shape[0]}-channel, "
                              f"{x.shape[2]}x{x.shape[1]}{'; --size N resizes them' if resizable else ''})") from None


def demand(spec: CertifySpec, cluster: dict) -> dict:
    """Its sampler actors: one GPU each (at most the cluster's), else one CPU each."""
    workers = spec.workers or sizing.default_workers(cluster)
    if on_gpu(cluster):
        return {"GPU": float(min(workers, cluster["GPU"]))}
    return {"CPU": float(workers)}


def image_plan(spec: CertifySpec, dataset) -> list[int]:
    """The dataset indices a certify job covers, in order (every skip-th, at most max)."""
    return datasets.test_subset(dataset, skip=spec.skip, max=spec.max_images)


def load_pipeline(classifier: str | dict, denoiser: str | dict | None, device, settings: Settings | None = None):
    """f o D (or f alone), in eval mode on ``device``, from checkpoint paths or ``references.source``s."""
    def load(model, role):
        found = references.file_source(model) if isinstance(model, str) else model
        return references.load_source(settings, found, role, device)

    classifier = load(classifier, "classifier")
    if denoiser is None:
        return classifier.eval()
    return torch.nn.Sequential(load(denoiser, "denoiser"), classifier).eval()


def record_certificate(session: Session, job_id: int, image_index: int, label: int, cert: Certificate,
                       *, seconds: float, worker: str | None, device: str | None, model: dict | None = None,
                       extra: dict | None = None) -> None:
    """Upsert one image's result and mark its work unit done (idempotent).

    ``model`` is how the sampler ran f o D (``PreparedModel.describe()``: precision...), kept in ``extra``
    with anything else the job records (``extra``: the sequential mode, ``sequential_extra``).
    """
    extra = {**({"model": model} if model else {}), **(extra or {})}
    repo.upsert_result(
        session, job_id, image_index, label=label, prediction=cert.prediction, radius=cert.radius,
        correct=cert.prediction == label, p_lower=cert.p_lower,
        counts_selection=[int(c) for c in cert.counts_selection],
        counts_estimation=[int(c) for c in cert.counts_estimation],
        n0=cert.n0, n=cert.n, alpha=cert.alpha, sigma=cert.sigma, seconds=seconds, worker=worker, device=device,
        extra=extra or None)
    repo.upsert_work_unit(session, job_id, f"image:{image_index}", status="done", worker=worker)


def sequential_extra(spec) -> dict:
    """What a sequential job's results carry in ``extra``: its mode, target radius and sample cap."""
    return {"mode": "sequential", "target_radius": spec.radius, "max_n": spec.max_n}


KIND = Kind(name="certify", spec=CertifySpec, check=check, demand=demand, run="workers.certify_loop:run")
