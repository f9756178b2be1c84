"""Job specs: frozen, validated descriptions of a job, with a JSON round trip.

A spec is everything needed to (re)run a job; it is stored in the jobs table, so
``from_dict(spec.to_dict()) == spec``. Model references (``classifier``,
``denoiser``, ``init``, ``surrogates``) are strings: a checkpoint file path, or
``job:ID`` for the checkpoint produced by a finished training job (resolved by
``dsq.jobs`` against the database).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from dsq import objectives, smoothing
from dsq.errors import InvalidArgument, UnknownName

TARGETS = ("denoiser", "classifier")
OPTIMIZERS = ("adam", "sgd")
REFERENCE = re.compile(r"^job:\d+$")


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
    data_root: str | None = None
    name: str | None = None
    kind: str = "train"

    def __post_init__(self):
        object.__setattr__(self, "surrogates", tuple(self.surrogates))
        _check_choice("target", self.target, TARGETS)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        allowed = objectives.DENOISER_OBJECTIVES if self.target == "denoiser" else objectives.CLASSIFIER_OBJECTIVES
        if self.objective not in allowed:
            raise UnknownName(f"unknown {self.target} objective {self.objective!r}; expected one of {', '.join(allowed)}")
        _check_sigma(self.sigma, allow_zero=self.objective in ("standard",))
        for name in ("epochs", "batch_size", "lr_step"):
            _check_positive_int(name, getattr(self, name))
        if not self.lr > 0:
            raise InvalidArgument(f"lr must be > 0, got {self.lr!r}")
        self._check_models()

    def _check_models(self):
        if self.target == "denoiser" and self.objective in objectives.NEEDS_CLASSIFIER:
            if not self.classifier and not self.surrogates:
                raise InvalidArgument(f"objective {self.objective!r} needs --classifier (white-box) or --surrogate (black-box)")
            if self.classifier and self.surrogates:
                raise InvalidArgument("give either --classifier (white-box) or --surrogate (black-box), not both")
        if self.objective == "stab_mse" and not self.init:
            raise InvalidArgument("objective 'stab_mse' fine-tunes an MSE denoiser: give --init CHECKPOINT")

    @property
    def classifiers(self) -> tuple[str, ...]:
        """The classifiers the objective uses: the target (white-box) or the surrogates."""
        return (self.classifier,) if self.classifier else self.surrogates

    def references(self) -> tuple[str, ...]:
        return tuple(r for r in (*self.classifiers, self.init) if r)

    def to_dict(self) -> dict:
        return _to_dict(self)


@dataclass(frozen=True)
class CertifySpec:
    """Certify the smoothed classifier f o D on a deterministic subset of a dataset."""

    dataset: str
    classifier: str
    sigma: float
    denoiser: str | None = None
    n0: int = 100
    n: int = 100_000
    alpha: float = 0.001
    batch_size: int = 1000
    split: str = "test"
    skip: int = 1
    max_images: int | None = None
    seed: int = 0
    workers: int = 1
    data_root: str | None = None
    name: str | None = None
    kind: str = "certify"

    def __post_init__(self):
        smoothing.validate(sigma=self.sigma, n0=self.n0, n=self.n, alpha=self.alpha, batch_size=self.batch_size)
        _check_choice("split", self.split, ("train", "test"))
        _check_positive_int("skip", self.skip)
        _check_positive_int("workers", self.workers)
        if self.max_images is not None:
            _check_positive_int("max images", self.max_images)

    def references(self) -> tuple[str, ...]:
        return tuple(r for r in (self.classifier, self.denoiser) if r)

    def to_dict(self) -> dict:
        return _to_dict(self)


SPECS = {"train": TrainSpec, "certify": CertifySpec}


def from_dict(data: dict[str, Any]):
    """Rebuild (and so re-validate) a spec from its JSON form."""
    kind = data.get("kind")
    if kind not in SPECS:
        raise UnknownName(f"unknown job kind {kind!r}; expected one of {', '.join(SPECS)}")
    cls = SPECS[kind]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise InvalidArgument(f"unknown field(s) in {kind} spec: {', '.join(sorted(unknown))}")
    return cls(**data)


def is_job_reference(reference: str) -> bool:
    return bool(REFERENCE.match(reference))


def _to_dict(spec) -> dict:
    data = dataclasses.asdict(spec)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


def _check_choice(name, value, choices):
    if value not in choices:
        raise InvalidArgument(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def _check_sigma(sigma, *, allow_zero: bool):
    if not isinstance(sigma, (int, float)) or sigma < 0 or (sigma == 0 and not allow_zero):
        raise InvalidArgument(f"sigma must be > 0, got {sigma!r}")


def _check_positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidArgument(f"{name} must be an integer >= 1, got {value!r}")
