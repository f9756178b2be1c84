"""What every job spec shares: frozen, validated descriptions of a job, with a JSON round trip.

Each job kind (``dsq.kinds``) builds its spec class from these parts: a frozen dataclass whose construction
validates it, stored in the jobs table as ``to_dict()`` and rebuilt by ``dsq.kinds.from_dict``, so
``from_dict(spec.to_dict()) == spec``. Model references (``classifier``, ``denoiser``, ``init``,
``surrogates``) are strings: a file, ``torchvision:NAME``, ``package.module:function``, or ``job:ID`` for
the checkpoint of a finished training job (``dsq.references``).

Certification draws a fixed n per image and reports the largest radius it can, or, with a target
``radius``, runs the sequential test of ``dsq.sequential``: per image "certified within >= radius, or
not", with at most ``max_n`` estimation samples (``max_n`` defaults to ``n``). An n or a target that
can never certify is refused: such a job could only spend samples.

Nothing here imports torch (nor scipy, until a certification spec is checked): a spec is checked for what it
says alone. Checks that load a model or read
the data belong to the kind's ``check``, run once at submit.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

from dsq import checks, uploads, usermodels
from dsq.errors import InvalidArgument
from dsq.text import check_name

MAX_SIGMA = 4.0  # noise 4x the pixel range: every image is drowned; larger values are 0-255 units by mistake
WARN_SIGMA = 1.0  # the largest sigma of the papers' grids; above it, say so
REFERENCE = re.compile(r"^job:\d+$")
# The names of what a spec may ask for; the modules that implement them (dsq.objectives, dsq.fastpath)
# build their tables from these, so a spec is checked without importing torch.
DENOISER_OBJECTIVES = ("mse", "stab", "stab_mse", "clf", "diffusion")
DIFFUSION_ARCHS = ("unet",)  # what the diffusion objective trains: an ε-model, a denoiser at every σ
CLASSIFIER_OBJECTIVES = ("standard", "gaussian")
NEEDS_CLASSIFIER = ("stab", "stab_mse", "clf")  # the denoiser objectives that train against a classifier
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Kind:
    """A job kind: its spec class, its submit-time check and what a running job of it holds.

    The Ray side owns the table from a kind's name to the loop that runs it.
    """

    name: str
    spec: type  # frozen dataclass with to_dict(); constructing it validates it
    check: Callable  # (session, spec, settings) -> work total; raises a DsqError when the job cannot run
    demand: Callable  # (spec, cluster resources) -> what a running job holds, e.g. {"CPU": 1.0}


ACTOR_MEMORY = 3 << 29  # 1.5 GiB a sampler actor: torch in a process (~0.7 GB) plus a model and its batches


def on_gpu(cluster: dict) -> bool:
    """Whether Ray's ``cluster_resources()`` has a GPU: a job's demand is then counted in GPUs."""
    return cluster.get("GPU", 0) >= 1


def default_workers(cluster: dict) -> int:
    """Sampler actors for a job, from Ray's ``cluster_resources()``: one per GPU, else one per CPU."""
    gpus = int(cluster.get("GPU", 0))
    if gpus:
        return gpus
    cpus = int(cluster.get("CPU", 1))
    memory = cluster.get("memory")
    by_memory = int(memory // ACTOR_MEMORY) if memory else cpus
    return max(1, min(cpus, by_memory))


class TargetRadiusMode:
    """What a certify spec with optional ``radius`` and ``max_n`` fields says about its sampling mode."""

    @property
    def sequential(self) -> bool:
        return self.radius is not None

    @property
    def most_n(self) -> int:
        """The most estimation samples (or queries) one image can take: max_n in sequential mode, else n."""
        return self.max_n if self.sequential else self.n


def rebuild(cls, data: dict[str, Any]):
    """A spec of class ``cls`` from its JSON form (and so validated again): unknown or missing fields refused."""
    if not isinstance(data, dict):
        raise InvalidArgument(f"a job spec must be a JSON object, got {type(data).__name__}")
    kind = data.get("kind", cls.__name__)
    fields = dataclasses.fields(cls)
    unknown = set(data) - {f.name for f in fields}
    if unknown:
        raise InvalidArgument(f"unknown field(s) in {kind} spec: {', '.join(sorted(unknown))}")
    missing = [f.name for f in fields if f.name not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise InvalidArgument(f"{kind} spec lacks required field(s): {', '.join(missing)}")
    return cls(**data)


def to_dict(spec) -> dict:
    """A spec's JSON form: its fields, tuples as lists."""
    data = dataclasses.asdict(spec)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


def is_job_reference(reference: str) -> bool:
    return bool(REFERENCE.match(reference))


def check_common(spec, kind: str) -> None:
    """What every spec checks: its kind, name, seed and image size."""
    if spec.kind != kind:
        raise InvalidArgument(f"a {type(spec).__name__} has kind {kind!r}, got {spec.kind!r}")
    if spec.name is not None:
        check_name(spec.name, "job name")
    if hasattr(spec, "uploads"):
        uploads.check(spec.uploads)
    if not isinstance(spec.seed, int) or isinstance(spec.seed, bool):
        raise InvalidArgument(f"seed must be an integer, got {spec.seed!r}")
    if getattr(spec, "size", None) is not None:
        checks.positive_int("size", spec.size)


def input_files(dataset, inputs) -> tuple[str, ...]:
    """A spec's ``inputs`` as a tuple of paths: either a dataset or image files, not both and not neither."""
    if isinstance(inputs, str) or not isinstance(inputs, (list, tuple)):
        raise InvalidArgument(f"inputs must be a list of image file paths, got {inputs!r}")
    if bool(dataset) == bool(inputs):
        raise InvalidArgument("give either a dataset or a list of input images, not both and not neither")
    if dataset is not None and not isinstance(dataset, str):
        raise InvalidArgument(f"dataset must be a name, got {dataset!r}")
    if any(not isinstance(path, str) or not path for path in inputs):
        raise InvalidArgument("every input must be a file path")
    return tuple(inputs)


def check_classes(spec) -> None:
    """``spec.classes``: a folder dataset's class order, distinct names (label i is ``classes[i]``); None leaves it
    to the folder (its class folders sorted by name, recorded at submit). Whether they name the folder's classes
    is checked when the data is read."""
    if spec.classes is None:
        return
    if not (spec.dataset or "").startswith("folder"):
        raise InvalidArgument(f"--classes applies to folder: datasets, not to {spec.dataset or 'input files'}")
    names = spec.classes
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(c, str) and c and c == c.strip()
                                                                    for c in names):
        raise InvalidArgument(f"--classes must be class names separated by commas, got {names!r}")
    repeated = [name for name in names if names.count(name) > 1]
    if repeated:
        raise InvalidArgument(f"--classes: {repeated[0]!r} is listed twice")
    object.__setattr__(spec, "classes", tuple(names))


def class_order(classes) -> str:
    """``0 cat, 1 dog, 2 fox``: each label and its class."""
    return ", ".join(f"{label} {name}" for label, name in enumerate(classes))


def check_sigma(sigma, *, allow_zero: bool = False) -> None:
    """sigma is a finite number > 0 (>= 0 for a standard classifier, trained without noise), in [0, 1] units."""
    if not checks.is_real(sigma) or not math.isfinite(sigma) or sigma < 0:
        raise InvalidArgument(f"sigma must be a finite number >= 0, got {sigma!r}")
    if sigma == 0 and not allow_zero:
        raise InvalidArgument("sigma must be > 0 (sigma 0 is only for a 'standard' classifier), got 0")
    check_sigma_scale(sigma)


def check_sigma_scale(sigma) -> None:
    """sigma is in [0, 1] pixel units: refuse values no one can mean (noise 4x the whole pixel range)."""
    if checks.is_real(sigma) and sigma > MAX_SIGMA:
        raise InvalidArgument(f"sigma {sigma:g} is far above the [0, 1] pixel range (sigma is in [0, 1] pixel "
                              f"units; did you mean {sigma:g}/255 = {sigma / 255:.4g}?)")


def check_certification(spec) -> None:
    """n0, n, alpha and the mode of a certification spec (``radius``, ``max_n``): it can certify something.

    Sequential mode (``spec.radius`` set): max_n defaults to n; a radius max_n can never certify is refused.
    Fixed n: with all n votes for cA, p_lower = alpha^(1/n), so the largest radius is sigma * Phi^-1(alpha^(1/n)),
    which is 0 when alpha^(1/n) <= 1/2 (``bounds.max_radius``): such an n is refused.
    """
    from dsq import bounds  # numpy and scipy.special: only certification specs need them

    if not isinstance(spec.predict, bool):
        raise InvalidArgument(f"predict must be true or false, got {spec.predict!r}")
    if spec.predict:
        return check_prediction(spec)
    bounds.validate(sigma=spec.sigma, n0=spec.n0, n=spec.n, alpha=spec.alpha, batch_size=1)
    check_sigma_scale(spec.sigma)
    if spec.radius is None:
        if spec.max_n is not None:
            raise InvalidArgument(f"max n ({spec.max_n!r}) needs a target radius (--radius); "
                                  f"without one, each image takes a fixed n")
        if bounds.max_radius(spec.n, spec.alpha, spec.sigma) == 0.0:
            raise InvalidArgument(f"n = {spec.n} estimation samples can never certify at alpha {spec.alpha:g} "
                                  f"(even {spec.n} of {spec.n} votes leave p_lower <= 1/2); the smallest n that "
                                  f"can is {bounds.min_n(spec.alpha)}")
        return
    from dsq import sequential

    sequential.check_radius(spec.radius)
    if spec.max_n is None:
        object.__setattr__(spec, "max_n", spec.n)
    checks.positive_int("max n", spec.max_n)
    if spec.max_n < spec.n0:
        raise InvalidArgument(f"max n must be at least n0 = {spec.n0}, got {spec.max_n}")
    largest = sequential.max_sequential_radius(spec.max_n, spec.alpha, spec.sigma)
    if spec.radius > largest:
        raise InvalidArgument(f"radius {spec.radius:g} is out of reach: {spec.max_n} samples at alpha "
                              f"{spec.alpha:g} certify at most radius {largest:.4g} at sigma {spec.sigma:g} "
                              f"(such a job could only spend samples); lower --radius or raise --max-n")


def check_prediction(spec) -> None:
    """A PREDICT spec (``spec.predict``): n samples at level alpha, no selection phase (n0 = 0) and no radius.

    n of n votes for one class give the two-sided binomial p-value 2 / 2^n; an n whose p-value can never reach
    alpha could only abstain, and is refused.
    """
    from dsq import bounds

    if spec.radius is not None or spec.max_n is not None:
        raise InvalidArgument("PREDICT certifies no radius: --radius and --max-n belong to certification "
                              "(dsq submit certify)")
    if spec.n0 != 0:
        raise InvalidArgument(f"PREDICT draws no selection samples: n0 must be 0, got {spec.n0!r}")
    bounds.validate(sigma=spec.sigma, n0=1, n=spec.n, alpha=spec.alpha, batch_size=1)
    check_sigma_scale(spec.sigma)
    smallest = bounds.min_predict_n(spec.alpha)
    if spec.n < smallest:
        raise InvalidArgument(f"n = {spec.n} samples can only abstain at alpha {spec.alpha:g} (even {spec.n} of "
                              f"{spec.n} votes leave a p-value above alpha); the smallest n that can answer is "
                              f"{smallest}")


def reach(spec) -> str:
    """One line on what a (valid) certification or PREDICT spec can answer."""
    from dsq import bounds

    if spec.predict:
        return (f"PREDICT: {spec.n:,} samples per image; an image gets the top class when a binomial test of it "
                f"against the runner-up rejects a tie at alpha {spec.alpha:g}, else abstains (no radius)")

    if spec.radius is not None:
        from dsq import sequential  # scipy.special: only sequential specs need it

        largest = sequential.max_sequential_radius(spec.max_n, spec.alpha, spec.sigma)
        return (f"sequential: each image is certified at radius >= {spec.radius:g} or abstains, with at most "
                f"{spec.max_n:,} estimation samples (they can reach radius {largest:.4g} at most)")
    largest = bounds.max_radius(spec.n, spec.alpha, spec.sigma)
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


def references_tuple(name: str, references) -> tuple[str, ...]:
    """A list of model references as a tuple; a lone string is refused (it is not a list of names)."""
    if not isinstance(references, (list, tuple)) or not all(isinstance(r, str) and r for r in references):
        raise InvalidArgument(f"{name} must be a list of checkpoint paths or job:ID references, got {references!r}")
    return tuple(references)


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
        if reference not in spec.models and usermodels.form(reference) in ("torchvision", "diffusers"):
            usermodels.check_options(reference, {}, role)
    object.__setattr__(spec, "models", {reference: usermodels.check_options(reference, options, roles[reference])
                                        for reference, options in spec.models.items()})
