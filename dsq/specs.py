"""Job specs: frozen, validated descriptions of a job, with a JSON round trip.

A spec is everything needed to (re)run a job; it is stored in the jobs table, so
``from_dict(spec.to_dict()) == spec``. Model references (``classifier``,
``denoiser``, ``init``, ``surrogates``) are strings: a checkpoint file path, or
``job:ID`` for the checkpoint produced by a finished training job (resolved by
``dsq.jobs`` against the database).

Certification draws a fixed n per image and reports the largest radius it can, or, with a
target ``radius``, runs the sequential test of ``dsq.sequential``: per image "certified within
>= radius, or not", with at most ``max_n`` estimation samples (``max_n`` defaults to ``n``).
A target no run of ``max_n`` samples can reach is refused: such a job could only spend samples.
Specs stored before these fields existed load with their defaults (fixed n).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from dsq import fastpath, objectives, sequential, smoothing, usermodels
from dsq.apis.spec import ApiCertifySpec
from dsq.errors import InvalidArgument, UnknownName
from dsq.text import check_name

TARGETS = ("denoiser", "classifier")
MAX_SIGMA = 4.0  # noise 4x the pixel range: every image is drowned; larger values are 0-255 units by mistake
WARN_SIGMA = 1.0  # the largest sigma of the papers' grids; above it, say so
OPTIMIZERS = ("adam", "sgd")
REFERENCE = re.compile(r"^job:\d+$")
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
    size: int | None = None  # resize and center-crop images to size x size (None: a folder's own size)
    data_root: str | None = None
    name: str | None = None
    models: dict = field(default_factory=dict)  # the user's own models' options: {reference: {weights, args, ...}}
    kind: str = "train"

    def __post_init__(self):
        _check_kind(self, "train")
        object.__setattr__(self, "surrogates", _references_tuple("surrogates", self.surrogates))
        if not isinstance(self.arch_kwargs, dict) or not all(isinstance(k, str) for k in self.arch_kwargs):
            raise InvalidArgument(f"arch_kwargs must be a dict of argument names to values, got {self.arch_kwargs!r}")
        _check_choice("target", self.target, TARGETS)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        allowed = objectives.DENOISER_OBJECTIVES if self.target == "denoiser" else objectives.CLASSIFIER_OBJECTIVES
        if self.objective not in allowed:
            raise UnknownName(f"unknown {self.target} objective {self.objective!r}; expected one of {', '.join(allowed)}")
        _check_sigma(self.sigma, allow_zero=self.objective == "standard")
        check_sigma_scale(self.sigma)
        if self.name is not None:
            check_name(self.name, "job name")
        for name in ("epochs", "batch_size", "lr_step"):
            _check_positive_int(name, getattr(self, name))
        _check_seed(self.seed)
        _check_size(self.size)
        self._check_optimizer_numbers()
        self._check_models()
        if self.init and usermodels.form(self.init) in ("torchvision", "factory"):
            raise InvalidArgument(f"--init must be a dsq checkpoint (job:N or a file dsq wrote), got {self.init}")
        check_models(self)

    def _check_optimizer_numbers(self):
        for name, (ok, rule) in OPTIMIZER_NUMBERS.items():
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value) or not ok(value):
                raise InvalidArgument(f"{name} must be a finite number {rule}, got {value!r}")

    def _check_models(self):
        if self.classifier and self.surrogates:
            raise InvalidArgument("give either --classifier (white-box) or --surrogate (black-box), not both")
        if self.target == "denoiser" and self.objective in objectives.NEEDS_CLASSIFIER:
            if not self.classifier and not self.surrogates:
                raise InvalidArgument(f"objective {self.objective!r} needs --classifier (white-box) or --surrogate (black-box)")
        if self.objective == "stab_mse" and not self.init:
            raise InvalidArgument("objective 'stab_mse' fine-tunes an MSE denoiser: give --init CHECKPOINT")

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
        return _to_dict(self)


@dataclass(frozen=True)
class CertifySpec(sequential.TargetRadiusMode):
    """Certify the smoothed classifier f o D on a deterministic subset of a dataset."""

    dataset: str
    classifier: str
    sigma: float
    denoiser: str | None = None
    n0: int = 100
    n: int = 100_000
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
    size: int | None = None  # resize and center-crop images to size x size (None: a folder's own size)
    data_root: str | None = None
    name: str | None = None
    models: dict = field(default_factory=dict)  # the user's own models' options: {reference: {weights, args, ...}}
    kind: str = "certify"

    def __post_init__(self):
        _check_kind(self, "certify")
        batch_size = 1 if self.batch_size is None else self.batch_size
        smoothing.validate(sigma=self.sigma, n0=self.n0, n=self.n, alpha=self.alpha, batch_size=batch_size)
        check_sigma_scale(self.sigma)
        check_target(self)
        if self.name is not None:
            check_name(self.name, "job name")
        _check_choice("split", self.split, ("train", "test"))
        _check_positive_int("skip", self.skip)
        if self.workers is not None:
            _check_positive_int("workers", self.workers)
        _check_choice("precision", self.precision, tuple(fastpath.PRECISIONS))
        if not isinstance(self.compile, bool):
            raise InvalidArgument(f"compile must be true or false, got {self.compile!r}")
        _check_seed(self.seed)
        if self.max_images is not None:
            _check_positive_int("max images", self.max_images)
        _check_size(self.size)
        check_models(self)

    def references(self) -> tuple[str, ...]:
        return tuple(r for r in (self.classifier, self.denoiser) if r)

    def model_roles(self) -> list[tuple[str, str]]:
        return [(self.classifier, "classifier")] + ([(self.denoiser, "denoiser")] if self.denoiser else [])

    def to_dict(self) -> dict:
        return _to_dict(self)


SPECS = {"train": TrainSpec, "certify": CertifySpec, "certify_api": ApiCertifySpec}


def from_dict(data: dict[str, Any]):
    """Rebuild (and so re-validate) a spec from its JSON form."""
    if not isinstance(data, dict):
        raise InvalidArgument(f"a job spec must be a JSON object, got {type(data).__name__}")
    kind = data.get("kind")
    if kind not in SPECS:
        raise UnknownName(f"unknown job kind {kind!r}; expected one of {', '.join(SPECS)}")
    fields = dataclasses.fields(SPECS[kind])
    unknown = set(data) - {f.name for f in fields}
    if unknown:
        raise InvalidArgument(f"unknown field(s) in {kind} spec: {', '.join(sorted(unknown))}")
    missing = [f.name for f in fields if f.name not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise InvalidArgument(f"{kind} spec lacks required field(s): {', '.join(missing)}")
    return SPECS[kind](**data)


def is_job_reference(reference: str) -> bool:
    return bool(REFERENCE.match(reference))


def _to_dict(spec) -> dict:
    data = dataclasses.asdict(spec)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


def check_models(spec) -> None:
    """``spec.models`` gives options only to models the job uses, each checked (``dsq.usermodels``).

    A torchvision model is checked without an entry too: it needs its weights.
    """
    if not isinstance(spec.models, dict):
        raise InvalidArgument(f"models must be a table of model references to options, got {spec.models!r}")
    roles = dict(reversed(spec.model_roles()))
    unused = [reference for reference in spec.models if reference not in roles]
    if unused:
        raise InvalidArgument(f"options given for {unused[0]}, which this job does not use "
                              f"(its models: {', '.join(roles) or 'none'})")
    for reference, role in roles.items():
        if reference not in spec.models and usermodels.form(reference) == "torchvision":
            usermodels.check_options(reference, {}, role)
    object.__setattr__(spec, "models", {reference: usermodels.check_options(reference, options, roles[reference])
                                        for reference, options in spec.models.items()})


def check_target(spec) -> None:
    """Sequential mode (``spec.radius`` set): max_n defaults to n; refuse a radius max_n can never certify.

    Shared by every certification spec (``radius``, ``max_n``, ``n0``, ``n``, ``alpha``, ``sigma``).
    """
    if spec.radius is None:
        if spec.max_n is not None:
            raise InvalidArgument(f"max n ({spec.max_n!r}) needs a target radius (--radius); "
                                  f"without one, each image takes a fixed n")
        return
    if not _is_real(spec.radius) or not math.isfinite(spec.radius) or spec.radius <= 0:
        raise InvalidArgument(f"radius must be a finite number > 0, got {spec.radius!r}")
    if spec.max_n is None:
        object.__setattr__(spec, "max_n", spec.n)
    _check_positive_int("max n", spec.max_n)
    if spec.max_n < spec.n0:
        raise InvalidArgument(f"max n must be at least n0 = {spec.n0}, got {spec.max_n}")
    largest = sequential.max_sequential_radius(spec.max_n, spec.alpha, spec.sigma)
    if spec.radius > largest:
        raise InvalidArgument(f"radius {spec.radius:g} is out of reach: {spec.max_n} samples at alpha "
                              f"{spec.alpha:g} certify at most radius {largest:.4g} at sigma {spec.sigma:g} "
                              f"(such a job could only spend samples); lower --radius or raise --max-n")


def reach(spec) -> str:
    """One line on what a certification spec can certify; InvalidArgument when its n can never certify.

    Fixed n: with all n votes for cA, p_lower = alpha^(1/n), so the largest radius is
    sigma * Phi^-1(alpha^(1/n)), which is 0 when alpha^(1/n) <= 1/2 (``sequential.max_radius``).
    """
    if spec.radius is not None:
        largest = sequential.max_sequential_radius(spec.max_n, spec.alpha, spec.sigma)
        return (f"sequential: each image is certified at radius >= {spec.radius:g} or abstains, with at most "
                f"{spec.max_n:,} estimation samples (they can reach radius {largest:.4g} at most)")
    largest = sequential.max_radius(spec.n, spec.alpha, spec.sigma)
    if largest == 0.0:
        raise InvalidArgument(f"n = {spec.n} estimation samples can never certify at alpha {spec.alpha:g} "
                              f"(even {spec.n} of {spec.n} votes leave p_lower <= 1/2); the smallest n that can is "
                              f"{sequential.min_n(spec.alpha)}")
    return (f"n = {spec.n:,} at alpha {spec.alpha:g} certifies radius {largest:.4g} at most "
            f"({largest / spec.sigma:.3g} sigma)")


def given_n(n: int | None, max_n: int | None, radius: float | None, default: int) -> int:
    """The spec's n from the command-line options: --n, else --max-n in sequential mode, else ``default``.

    With --radius, n is only max_n's default, so a --n that differs from --max-n contradicts it.
    """
    if radius is not None and n is not None and max_n is not None and n != max_n:
        raise InvalidArgument(f"--n {n} contradicts --max-n {max_n}: with --radius, each image takes at most "
                              f"max n estimation samples (--n only gives its default); give one of them")
    if n is not None:
        return n
    return max_n if radius is not None and max_n is not None else default


def check_sigma_scale(sigma) -> None:
    """sigma is in [0, 1] pixel units: refuse values no one can mean (noise 4x the whole pixel range)."""
    if _is_real(sigma) and sigma > MAX_SIGMA:
        raise InvalidArgument(f"sigma {sigma:g} is far above the [0, 1] pixel range (sigma is in [0, 1] pixel "
                              f"units; did you mean {sigma:g}/255 = {sigma / 255:.4g}?)")


def _check_choice(name, value, choices):
    if value not in choices:
        raise InvalidArgument(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def _check_sigma(sigma, *, allow_zero: bool):
    """sigma must be a finite number > 0 (>= 0 for a standard classifier, trained without noise)."""
    if not _is_real(sigma) or not math.isfinite(sigma) or sigma < 0:
        raise InvalidArgument(f"sigma must be a finite number >= 0, got {sigma!r}")
    if sigma == 0 and not allow_zero:
        raise InvalidArgument("sigma must be > 0 (sigma 0 is only for a 'standard' classifier), got 0")


def _check_seed(seed):
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise InvalidArgument(f"seed must be an integer, got {seed!r}")


def _check_size(size):
    if size is not None:
        _check_positive_int("size", size)


def _check_kind(spec, kind: str):
    if spec.kind != kind:
        raise InvalidArgument(f"a {type(spec).__name__} has kind {kind!r}, got {spec.kind!r}")


def _references_tuple(name: str, references) -> tuple[str, ...]:
    """A list of model references as a tuple; a lone string is refused (it is not a list of names)."""
    if not isinstance(references, (list, tuple)) or not all(isinstance(r, str) and r for r in references):
        raise InvalidArgument(f"{name} must be a list of checkpoint paths or job:ID references, got {references!r}")
    return tuple(references)


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidArgument(f"{name} must be an integer >= 1, got {value!r}")
