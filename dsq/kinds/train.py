"""The ``train`` kind: train a denoiser (against frozen classifiers) or a classifier, store its checkpoint.

Its spec, its submit-time check, what a running job holds, and the training run its trainer actor
calls. The spec loads without torch (``dsq cancel`` and ``dsq resume`` rebuild
specs): the model and data modules are imported by the functions that use them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.orm import Session

from dsq import checks, specs, uploads, usermodels
from dsq.db import repo
from dsq.db.session import session_scope
from dsq.errors import ArtifactStoreError, InvalidArgument, UnknownName
from dsq.settings import Settings

TARGETS = ("denoiser", "classifier")
OPTIMIZERS = ("adam", "sgd")
OPTIMIZER_NUMBERS = {  # name: (accepts the value, the rule in words)
    "lr": (lambda v: v > 0, "> 0"),
    "lr_gamma": (lambda v: v > 0, "> 0"),
    "momentum": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
}


@dataclass(frozen=True)
class TrainSpec:
    """Train a denoiser (against frozen classifiers) or a classifier."""

    dataset: str
    target: str
    arch: str
    objective: str
    sigma: float
    arch_kwargs: dict = field(default_factory=dict)
    classifier: str | None = None
    surrogates: tuple[str, ...] = ()
    init: str | None = None
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    epochs: int = 10
    batch_size: int = 128
    lr_step: int = 30
    lr_gamma: float = 0.1
    seed: int = 0
    classes: tuple[str, ...] | None = None  # a folder's class order (None: sorted)
    size: int | None = None  # resize and center-crop images to size x size (None: a folder's own size)
    data_root: str | None = None
    name: str | None = None
    models: dict = field(default_factory=dict)  # the user's own models' options: {reference: {weights, args, ...}}
    uploads: dict = field(default_factory=dict)  # local paths in the artifact store (dsq.uploads)
    kind: str = "train"

    def __post_init__(self):
        specs.check_common(self, "train")
        specs.check_classes(self)
        specs.check_sigma(self.sigma, allow_zero=self.objective in ("standard", "diffusion"))
        object.__setattr__(self, "surrogates", specs.references_tuple("surrogates", self.surrogates))
        if not isinstance(self.arch_kwargs, dict) or not all(isinstance(k, str) for k in self.arch_kwargs):
            raise InvalidArgument(f"arch_kwargs must be a dict of argument names to values, got {self.arch_kwargs!r}")
        checks.choice("target", self.target, TARGETS)
        checks.choice("optimizer", self.optimizer, OPTIMIZERS)
        allowed = specs.DENOISER_OBJECTIVES if self.target == "denoiser" else specs.CLASSIFIER_OBJECTIVES
        if self.objective not in allowed:
            raise UnknownName(f"unknown {self.target} objective {self.objective!r}; expected one of {', '.join(allowed)}")
        for name in ("epochs", "batch_size", "lr_step"):
            checks.positive_int(name, getattr(self, name))
        self._check_optimizer_numbers()
        self._check_models()
        if self.init and usermodels.form(self.init) in ("torchvision", "factory"):
            raise InvalidArgument(f"--init must be a dsq checkpoint (job:N or a file dsq wrote), got {self.init}")
        specs.check_models(self)
    def _check_optimizer_numbers(self):
        for name, (ok, rule) in OPTIMIZER_NUMBERS.items():
            checks.finite(name, getattr(self, name), ok, rule)

    def _check_models(self):
        if self.classifier and self.surrogates:
            raise InvalidArgument("give either --classifier (white-box) or --surrogate (black-box), not both")
        if self.target == "denoiser" and self.objective in specs.NEEDS_CLASSIFIER:
            if not self.classifier and not self.surrogates:
                raise InvalidArgument(f"objective {self.objective!r} needs --classifier (white-box) or --surrogate (black-box)")
        if self.objective == "stab_mse" and not self.init:
            raise InvalidArgument("objective 'stab_mse' fine-tunes an MSE denoiser: give --init CHECKPOINT")
        if (self.objective == "diffusion") != (self.arch in specs.DIFFUSION_ARCHS):
            raise InvalidArgument(f"objective 'diffusion' trains arch {' or '.join(specs.DIFFUSION_ARCHS)}, and only "
                                  f"it does; got objective {self.objective!r} with arch {self.arch!r}")
        if self.objective == "diffusion" and (self.sigma or self.classifiers or self.init):
            raise InvalidArgument("objective 'diffusion' trains a DDPM on clean images: it takes no sigma (one model "
                                  "serves every sigma), no classifier, surrogate or init")

    @property
    def classifiers(self) -> tuple[str, ...]:
        """The classifiers the objective uses: the target (white-box) or the surrogates."""
        return (self.classifier,) if self.classifier else self.surrogates

    def references(self) -> tuple[str, ...]:
        return tuple(r for r in (*self.classifiers, self.init) if r)

    def model_roles(self) -> list[tuple[str, str]]:
        """(reference, the kind of model it must be) for each model this job loads."""
        return [(r, "classifier") for r in self.classifiers] + ([(self.init, self.target)] if self.init else [])

    def to_dict(self) -> dict:
        return specs.to_dict(self)


def default_arch(arch: str | None, objective: str) -> str:
    """The command line's --arch: unet for a DDPM, required otherwise."""
    if arch is None and objective != "diffusion":
        raise InvalidArgument("--arch is required (e.g. dncnn for a denoiser, small_cnn for a classifier)")
    return arch or specs.DIFFUSION_ARCHS[0]


def default_sigma(sigma: float | None, objective: str) -> float:
    """The command line's --sigma: none for a DDPM (it serves every sigma), else 0.25 unless given."""
    if sigma is None:
        return 0.0 if objective == "diffusion" else 0.25
    return sigma


def check(session: Session, spec: TrainSpec, settings: Settings) -> int:
    """Data, architecture and store are usable, and the models that exist now fit the data; work = epochs."""
    from dsq import artifacts, checkpoints, pipeline, references, sampling, training  # torch: models are loaded

    root = settings.data_root_of(spec)
    classifiers = [references.load(session, reference, settings, "classifier", spec.models.get(reference))
                   for reference in spec.classifiers if references.available(session, reference)]
    info, train_set, _, _ = pipeline.train_data(spec, root, classifiers)
    artifacts.store_for(settings).check()  # fail now, not after training, if the checkpoint cannot be stored
    training.build_model(spec, info)
    for model in classifiers:
        sampling.check_image(model, train_set[0][0])
    if spec.init and not specs.is_job_reference(spec.init) and usermodels.is_torchscript(spec.init):
        raise InvalidArgument(f"--init {spec.init} is a TorchScript file: fine-tuning needs a dsq checkpoint "
                              "(job:N or a file dsq wrote)")
    if spec.init and references.available(session, spec.init):
        checkpoints.load_checkpoint(references.resolve(session, spec.init, settings))
    return spec.epochs

def demand(spec: TrainSpec, cluster: dict) -> dict:
    """One trainer actor: a GPU, or one CPU."""
    return {"GPU": 1.0} if specs.on_gpu(cluster) else {"CPU": 1.0}


def run_training(engine, settings: Settings, job_id: int, spec: TrainSpec, device: str) -> dict:
    """Train what a train job describes, store its checkpoint and artifact row; return metrics.

    Progress and the loss go to the job's row and log each epoch; its loop
    steers it (cancel, hand-back) and stops the actor this runs in.
    """
    from dsq import pipeline, references, training  # torch

    with session_scope(engine) as session:
        sources = {r: references.source(session, r, spec.models.get(r), uploads=spec.uploads)
                   for r in spec.references()}
    frozen = [references.load_source(settings, sources[r], "classifier", device) for r in spec.classifiers]
    init = references.load_source(settings, sources[spec.init], spec.target, device) if spec.init else None
    data = uploads.data_spec(settings, spec)  # the store's copies of its folders, where it uploaded them
    info, train_set, test_set, notes = pipeline.train_data(data, settings.data_root_of(data),
                                                           frozen + ([init] if init is not None else []))
    if notes:  # images converted to the channels the job's models take: said in the job's log
        with session_scope(engine) as session:
            for note in notes:
                repo.add_log(session, job_id, note)

    def on_progress(done, total, metrics):
        with session_scope(engine) as session:
            repo.set_progress(session, job_id, done, total)
            repo.add_log(session, job_id, f"epoch {done}/{total} loss {metrics['loss']:.4f}")

    keep = checkpointing(engine, settings, job_id, spec, sources)
    model, metrics = training.train(spec, train_set, test_set, info, classifiers=frozen, init=init,
                                    device=device, on_progress=on_progress, checkpointing=keep)
    save_model(engine, settings, job_id, spec, info, model, metrics)
    _forget_resumable(engine, settings, job_id)
    return metrics


def checkpointing(engine, settings: Settings, job_id: int, spec: TrainSpec, sources: dict):
    """The job's resumable checkpoints (``dsq.trainstate``): the last one stored, and where the next go.

    One that cannot be read is said in one line and the training starts at epoch 1; one that cannot be
    written is said too, and the training goes on.
    """
    from dsq import artifacts, trainstate, training

    store = artifacts.store_for(settings)
    at = trainstate.key(job_id, spec.to_dict(), sources)

    def say(line: str, level: str = "info") -> None:
        with session_scope(engine) as session:
            repo.add_log(session, job_id, line, level=level)

    def save(state: dict) -> None:
        try:
            trainstate.save(store, at, state)
        except ArtifactStoreError as error:
            say(f"the resumable checkpoint was not stored: {error}", "warning")

    saved, problem = trainstate.load(store, at)
    if problem:
        say(f"the resumable checkpoint cannot be read ({problem}); starting over from epoch 1", "warning")
    return training.Checkpointing(saved=saved, save=save, say=say, every_seconds=settings.train_checkpoint_seconds)


def _forget_resumable(engine, settings: Settings, job_id: int) -> None:
    """Remove the job's resumable checkpoints once its model is stored; a store that refuses is said in the log."""
    from dsq import trainstate

    try:
        trainstate.remove(settings, job_id)
    except ArtifactStoreError as error:
        with session_scope(engine) as session:
            repo.add_log(session, job_id, f"the resumable checkpoints stay in the store: {error}", level="warning")


def save_model(engine, settings: Settings, job_id: int, spec: TrainSpec, info, model, metrics) -> None:
    """Write the checkpoint, put it in the artifact store, record its location and sha256."""
    import tempfile
    from pathlib import Path

    from dsq import artifacts, checkpoints, diffusion

    name = spec.name or f"{spec.target}-{spec.arch}-{spec.objective}"
    arch_kwargs = dict(spec.arch_kwargs)
    if spec.objective == "diffusion":
        arch_kwargs.setdefault("sample_size", info.height)
    if spec.target == "denoiser":
        arch_kwargs.setdefault("in_channels", info.channels)
    else:
        arch_kwargs.update(num_classes=info.num_classes, in_channels=info.channels)
    normalization = {"mean": list(info.mean), "std": list(info.std)} if spec.target == "classifier" else None
    schedule = diffusion.STANDARD_SCHEDULE if spec.objective == "diffusion" else None
    if schedule:  # recorded with the metrics too: `dsq show` prints it without loading the checkpoint
        metrics = {**metrics, "diffusion": schedule}
    with tempfile.TemporaryDirectory(prefix=f"dsq-job-{job_id}-") as scratch:
        path = Path(scratch) / "model.pt"
        checkpoints.save_checkpoint(path, kind=spec.target, arch=spec.arch, arch_kwargs=arch_kwargs,
                                    model=model.cpu(), normalization=normalization,
                                    training_spec=spec.to_dict(), metrics=metrics,
                                    diffusion=schedule)
        location, sha256 = artifacts.store_for(settings).put(path)
    with session_scope(engine) as session:
        repo.upsert_artifact(session, job_id=job_id, name=name, kind=spec.target, location=location,
                             sha256=sha256, spec=spec.to_dict(), metrics=metrics)
        repo.add_log(session, job_id, f"saved {location} (sha256 {sha256[:12]})")


KIND = specs.Kind(name="train", spec=TrainSpec, check=check, demand=demand)
