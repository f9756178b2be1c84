"""The ``certify`` kind: certify the smoothed f o D on a deterministic subset of a dataset.

Its spec, its submit-time check, what a running job holds, and the steps its loop
(on the Ray side) shares with the sampler actors. The spec loads without torch (``dsq
cancel`` and ``dsq resume`` rebuild specs): the model and data modules are imported by the functions
that use them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session

from dsq import checks, specs
from dsq.db import repo
from dsq.errors import InvalidArgument, UnreadableImage
from dsq.settings import Settings

if TYPE_CHECKING:
    from dsq.bounds import Certificate

DEFAULT_N = 100_000  # Cohen et al.'s n: certifies up to ~4 sigma at alpha 0.001 (bounds.max_radius)
PREVIEWS = 4  # the first images of a job that get a preview (dsq.previews): a few noisy samples beside D's output
MAX_PREVIEWS = 100  # a preview is a small PNG in the database; dsq preview JOB IMAGE asks for any other image


@dataclass(frozen=True, kw_only=True)
class CertifySpec(specs.TargetRadiusMode):
    """Certify the smoothed classifier f o D on a deterministic subset of a dataset or on image files; or, with
    ``predict``, give its PREDICT answer (a class or an abstain per image, no radius)."""

    dataset: str | None = None
    inputs: tuple[str, ...] = ()  # PREDICT: image files instead of a dataset; image i is the i-th file, no label
    classifier: str
    sigma: float
    denoiser: str | None = None
    n0: int = 100
    n: int = DEFAULT_N
    alpha: float = 0.001
    batch_size: int | None = None  # None: chosen for the hardware when the job starts (dsq.sizing), then kept
    split: str = "test"
    skip: int = 1
    max_images: int | None = None
    seed: int = 0
    workers: int | None = None  # None: one sampler actor per GPU, else one single-threaded actor per CPU
    precision: str = "fp32"  # bf16/fp16 autocast changes f: it is recorded with every result
    compile: bool = False  # noqa: A003 - torch.compile the sampler's model
    radius: float | None = None  # a target radius: sequential certification, "radius >= r or not" per image
    max_n: int | None = None  # sequential: the most estimation samples per image (None: n)
    classes: tuple[str, ...] | None = None  # a folder's class order (None: sorted)
    size: int | None = None  # resize and center-crop images to size x size (None: a folder's own size)
    predict: bool = False  # Cohen et al.'s PREDICT: n samples (no selection, n0 = 0), a class or an abstain
    previews: int = PREVIEWS  # its first images with a preview (noise of their own: no count changes); 0: none
    data_root: str | None = None
    name: str | None = None
    models: dict = field(default_factory=dict)  # the user's own models' options: {reference: {weights, args, ...}}
    uploads: dict = field(default_factory=dict)  # local paths in the artifact store (dsq.uploads)
    kind: str = "certify"

    def __post_init__(self):
        object.__setattr__(self, "inputs", specs.input_files(self.dataset, self.inputs))
        specs.check_common(self, "certify")
        if self.inputs and not self.predict:  # every image would count as wrong in a certified-accuracy table
            raise InvalidArgument("input files have no label, so a certified accuracy of them would mean nothing: "
                                  "certify a dataset (a folder: dataset has labels), or PREDICT them "
                                  "(dsq submit predict --input FILE)")
        specs.check_classes(self)
        specs.check_certification(self)
        if self.batch_size is not None:
            checks.positive_int("batch size", self.batch_size)
        checks.choice("split", self.split, ("train", "test"))
        checks.positive_int("skip", self.skip)
        if self.workers is not None:
            checks.positive_int("workers", self.workers)
        checks.choice("precision", self.precision, specs.PRECISIONS)
        if not isinstance(self.compile, bool):
            raise InvalidArgument(f"compile must be true or false, got {self.compile!r}")
        if self.max_images is not None:
            checks.positive_int("max images", self.max_images)
        if checks.positive_int("previews", self.previews, minimum=0) > MAX_PREVIEWS:
            raise InvalidArgument(f"previews must be at most {MAX_PREVIEWS} (dsq preview JOB IMAGE asks for any "
                                  f"other image), got {self.previews}")
        specs.check_models(self)

    def references(self) -> tuple[str, ...]:
        return tuple(r for r in (self.classifier, self.denoiser) if r)

    def model_roles(self) -> list[tuple[str, str]]:
        return [(self.classifier, "classifier")] + ([(self.denoiser, "denoiser")] if self.denoiser else [])

    def to_dict(self) -> dict:
        return specs.to_dict(self)


def check(session: Session, spec: CertifySpec, settings: Settings) -> int:
    """Data is there and, when its models exist now, f o D takes its images and has its classes; work = images."""
    from dsq import datasets, pipeline, references  # torch: only a submission loads models

    root = settings.data_root_of(spec)
    if spec.inputs:
        return _check_inputs(session, spec, settings)
    info = datasets.dataset_info(spec.dataset, root=root, size=spec.size)
    if all(references.available(session, r) for r in spec.references()):
        models = [references.load(session, r, settings, role, spec.models.get(r), sigma=spec.sigma)
                  for r, role in spec.model_roles()]
        dataset, _ = pipeline.job_dataset(spec, root, pipeline.model_channels(*models))
        outputs = pipeline.takes_images(models, dataset[0][0], spec)
    else:  # a classifier still to be trained will have the classes of its own dataset
        dataset = datasets.get_dataset(spec.dataset, spec.split, root=root, size=spec.size, classes=spec.classes)
        outputs = references.trained_classes(session, spec.classifier, settings)
    if outputs is not None and outputs != info.num_classes:
        raise InvalidArgument(f"the classifier has {outputs} outputs but dataset {spec.dataset} has "
                              f"{info.num_classes} classes: its labels and the predictions would not match")
    return len(pipeline.image_plan(spec, dataset))


def _check_inputs(session: Session, spec: CertifySpec, settings: Settings) -> int:
    """Every input file reads as an image of one shape (``--size`` makes it so), which f o D takes when its models
    exist now; work = the files the job covers."""
    from dsq import datasets, pipeline, references

    files = datasets.InputImages(spec.inputs, spec.size)
    plan = pipeline.image_plan(spec, files)
    shapes = {}
    for index in plan:
        try:
            shapes.setdefault(tuple(files[index][0].shape[1:]), spec.inputs[index])
        except UnreadableImage as error:
            raise InvalidArgument(str(error)) from None
    if len(shapes) > 1:
        (a, first), (b, second) = list(shapes.items())[:2]
        raise InvalidArgument(f"the input images differ in size ({first} is {a[1]}x{a[0]}, {second} is "
                              f"{b[1]}x{b[0]}); --size N resizes and center-crops them all to NxN")
    if all(references.available(session, r) for r in spec.references()):
        models = [references.load(session, r, settings, role, spec.models.get(r), sigma=spec.sigma)
                  for r, role in spec.model_roles()]
        dataset, _ = pipeline.job_dataset(spec, None, pipeline.model_channels(*models))
        pipeline.takes_images(models, dataset[plan[0]][0], spec)
    return len(plan)


def demand(spec: CertifySpec, cluster: dict) -> dict:
    """Its sampler actors: one GPU each (at most the cluster's), else one CPU each."""
    workers = spec.workers or specs.default_workers(cluster)
    if specs.on_gpu(cluster):
        return {"GPU": float(min(workers, cluster["GPU"]))}
    return {"CPU": float(workers)}


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
    repo.upsert_work_unit(session, job_id, repo.image_unit(image_index), status="done", worker=worker)


def predict_extra(p_value: float) -> dict:
    """What a PREDICT result carries in ``extra``: its mode and the binomial test's p-value (it has no radius, and
    its ``p_lower`` is 0)."""
    return {"mode": "predict", "p_value": p_value}


def sequential_extra(spec) -> dict:
    """What a sequential job's results carry in ``extra``: its mode, target radius and sample cap."""
    return {"mode": "sequential", "target_radius": spec.radius, "max_n": spec.max_n}


KIND = specs.Kind(name="certify", spec=CertifySpec, check=check, demand=demand)
