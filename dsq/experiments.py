"""Experiment files: a whole plan (models to train, a sigma grid, methods to certify) as one submission.

An experiment is a TOML file::

    name = "digits"              # groups the jobs: dsq results --experiment NAME
    dataset = "digits"
    sigmas = [0.25, 0.5]
    radii = [0.0, 0.25, 0.5]     # optional: the table's radii
    size = 64                    # optional: --size of every job (folder and imagenet datasets)
    classes = ["cat", "dog"]     # optional: --classes of every job (a folder's class order)
    max_attempts = 3             # optional: --max-attempts of every job (runs lost to errors or dead workers)

    [models.f]                   # a train job (any `dsq submit train` option)
    target = "classifier"
    arch = "small_cnn"
    objective = "standard"

    [models.mse]                 # no `sigma`: trained once per sigma of the grid
    arch = "dncnn"
    objective = "mse"

    [models.stab]
    arch = "dncnn"
    objective = "stab_mse"
    classifier = "f"             # a model of this file (or a checkpoint path, or job:N)
    init = "mse"                 # the same sigma's mse denoiser

    [certify]                    # defaults of every certify job (any `dsq submit certify` option)
    n = 10000

    [[methods]]                  # one certify job per method and sigma
    label = "STAB+MSE"
    classifier = "f"
    denoiser = "stab"

A model is trained once per sigma unless it sets ``sigma`` or its objective is ``standard`` or
``diffusion`` (no noise: a DDPM serves every sigma); a model that uses a per-sigma model is per-sigma too. References to models of the
file become ``job:N`` references, so every job waits for the jobs it needs; in a checkpoint path
``{sigma}`` stands for the sigma at hand (``models/cohen-{sigma}.pt``).

``overrides`` (``dsq submit experiment FILE --set KEY=VALUE``) change the file before it is checked, for a smoke
run: a key of the file's top level sets it there; a ``[certify]`` key sets it in ``[certify]`` and in every method
that sets it; a ``[models.*]`` key (``epochs``) in every model; ``certify.KEY`` and ``models.NAME.KEY`` name one
table. VALUE is read as a TOML value (``20``, ``[0.25]``, ``"x"``), else taken as a string. Every job of the plan
records them in its ``meta`` (``overrides``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from dsq import checks
from dsq.db.models import DEFAULT_MAX_ATTEMPTS
from dsq.errors import DsqError, InvalidArgument
from dsq.kinds.certify import CertifySpec
from dsq.kinds.train import TrainSpec
from dsq.text import check_name

TOP_KEYS = {"name", "dataset", "size", "classes", "sigmas", "radii", "data_root", "seed", "models", "certify",
            "methods", "max_attempts"}
MODEL_REFERENCES = ("classifier", "init")  # plus "surrogates", a list
METHOD_REFERENCES = ("classifier", "denoiser")
# Objectives trained without smoothing noise, so once for the whole grid: a standard classifier, and a DDPM (one
# diffusion model denoises at every sigma).
UNSMOOTHED = ("standard", "diffusion")
TEST_IMAGES = {"digits": 364, "cifar10": 10_000, "imagenet": 50_000}  # test split sizes, for the estimate
# A plan larger than this is refused unless the caller allows more (--max-jobs): the paper's CIFAR-10 grid is 38
# jobs, and a typo in a generated file should not queue hundreds of thousands.
MAX_JOBS = 1_000
MAX_FILE_BYTES = 1 << 20  # an experiment file is a few hundred lines; a larger one is not one written by hand
_MODEL_NAME = re.compile(r"^[A-Za-z_][\w-]*$")  # how a model of the file is named (a path has / or .)


@dataclass
class Step:
    """One job of the plan: its key (``mse@0.25``), its spec (references to keys as ``step:KEY``), what it needs."""

    key: str
    spec: object
    needs: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)


@dataclass
class Plan:
    name: str
    steps: list[Step]
    radii: tuple[float, ...] | None = None
    overrides: dict = field(default_factory=dict)  # --set KEY=VALUE, as given
    max_attempts: int = DEFAULT_MAX_ATTEMPTS  # of every job (the file's `max_attempts`)


def load(path: str | Path, *, max_jobs: int = MAX_JOBS, overrides: tuple[str, ...] = ()) -> Plan:
    """Read and expand an experiment file; every mistake is one line naming the file and the key."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise InvalidArgument(f"{path}: {path.stat().st_size:,} bytes is not an experiment file (at most "
                                  f"{MAX_FILE_BYTES:,})")
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise InvalidArgument(f"{path}: no such experiment file") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise InvalidArgument(f"{path}: not a readable TOML file: {error}") from None
    changes = parse_overrides(overrides)
    try:
        override(data, changes)
        plan = expand(data, max_jobs=max_jobs)
    except DsqError as error:
        raise InvalidArgument(f"{path}: {error}") from None
    plan.overrides = changes
    return plan


def changed_by_set(overrides: dict) -> str:
    """The line that says what ``--set`` changed (``dsq submit experiment --dry-run``, ``dsq show``)."""
    return "changed by --set: " + ", ".join(f"{key}={value!r}" for key, value in overrides.items())


def parse_overrides(given) -> dict:
    """``KEY=VALUE`` texts as {KEY: value}; VALUE is a TOML value, else the text itself."""
    changes = {}
    for text in given:
        key, equals, raw = text.partition("=")
        if not equals or not key.strip():
            raise InvalidArgument(f"--set {text!r}: expected KEY=VALUE, e.g. --set max_images=20")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        changes[key.strip()] = value
    return changes


def override(data: dict, changes: dict) -> None:
    """Apply ``--set`` changes to the file's data (see the module docstring); an unknown key is refused."""
    models = _table(data, "models")
    tables = {"certify": _table(data, "certify"), **{f"models.{name}": t for name, t in models.items()}}
    methods = [m for m in data.get("methods", []) if isinstance(m, dict)]
    top = TOP_KEYS - {"models", "certify", "methods"}
    certify, train = (_fields(spec) - {"models", "name"} for spec in (CertifySpec, TrainSpec))
    for key, value in changes.items():
        where, _, field_ = key.rpartition(".")
        if where:
            allowed = certify if where == "certify" else train
            if where not in tables or field_ not in allowed:
                raise _unknown_key(f"--set {key}", field_ if where in tables else key,
                                   allowed if where in tables else {*tables, *top})
            tables[where][field_] = value
            continue
        if key not in top | certify | train:
            raise _unknown_key(f"--set {key}", key, top | certify | train)
        if key in top:
            data[key] = value
            continue
        targets = ([tables["certify"]] + [m for m in methods if key in m]) if key in certify else []
        targets += [t for name, t in tables.items() if name != "certify" and key in train and isinstance(t, dict)]
        if not targets:
            raise InvalidArgument(f"--set {key}: no table of this file takes {key!r} (it has no [models.NAME])")
        for table in targets:
            table[key] = value
    if "certify" in tables and tables["certify"] and "certify" not in data:
        data["certify"] = tables["certify"]


def expand(data: dict, *, max_jobs: int = MAX_JOBS) -> Plan:
    _keys("the file", data, TOP_KEYS, required=("name", "dataset", "sigmas", "methods"))
    sigmas = _numbers("sigmas", data["sigmas"], positive=True)
    radii = _numbers("radii", data["radii"], positive=False) if "radii" in data else None
    models = _table(data, "models")
    methods = data["methods"]
    if not isinstance(methods, list) or not methods or not all(isinstance(m, dict) for m in methods):
        raise InvalidArgument("methods must be a list of tables ([[methods]] with a label and a classifier)")
    planned = len(sigmas) * (len(methods) + len(models))  # at most: models fixed at one sigma are fewer
    if planned > max_jobs:
        raise InvalidArgument(f"the plan has up to {planned:,} jobs ({len(sigmas)} sigmas x ({len(methods)} methods "
                              f"+ {len(models)} models)), more than {max_jobs:,}; allow it with --max-jobs {planned}")
    _check_references(models, methods)
    common = {k: data[k] for k in ("dataset", "size", "classes", "data_root", "seed") if k in data}
    order = _model_order(models)
    per_sigma = _per_sigma(models, order)
    steps: dict[str, Step] = {}
    for name in order:
        for sigma in (sigmas if per_sigma[name] else [None]):
            steps.update([_model_step(name, models[name], sigma, per_sigma, common)])
    certify = _table(data, "certify")
    for method in methods:
        for sigma in sigmas:
            step = _method_step(method, certify, sigma, models, per_sigma, common)
            if radii:  # stored with each certification: the table's radii, whoever prints it later
                step.meta["radii"] = list(radii)
            if step.key in steps:
                raise InvalidArgument(f"two methods are labelled {method['label']!r}")
            steps[step.key] = step
    attempts = checks.positive_int("max_attempts", data.get("max_attempts", DEFAULT_MAX_ATTEMPTS))
    return Plan(check_name(data["name"], "experiment name"), list(steps.values()), radii, max_attempts=attempts)


def _numbers(key: str, values, *, positive: bool) -> tuple[float, ...]:
    """A non-empty list of distinct finite numbers (> 0 or >= 0), as ``key`` of the file."""
    rule = "> 0" if positive else ">= 0"
    if not isinstance(values, list) or not values or not all(_number(v) and (v > 0 or not positive and v == 0)
                                                              for v in values):
        raise InvalidArgument(f"{key} must be a non-empty list of finite numbers {rule}, got {values!r}")
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise InvalidArgument(f"{key}: {repeated[0]:g} is listed twice")
    return tuple(values)


def _check_references(models: dict, methods: list) -> None:
    """A reference that is named like a model of the file (no path, no job:N) must be one: a typo is refused here,
    naming the table and the key, not when the plan is submitted."""
    tables = [(f"[models.{name}]", table) for name, table in models.items() if isinstance(table, dict)]
    tables += [(f"[[methods]] {m.get('label')!r}" if m.get("label") else "[[methods]]", m) for m in methods]
    for where, table in tables:
        for key in MODEL_REFERENCES + METHOD_REFERENCES + ("surrogates",):
            values = table.get(key)
            for value in values if isinstance(values, list) else [values]:
                if isinstance(value, str) and _MODEL_NAME.match(value) and value not in models:
                    close = difflib.get_close_matches(value, list(models), n=1)
                    hint = f"; did you mean {close[0]!r}?" if close else ""
                    raise InvalidArgument(f"{where}: {key} {value!r} is not a model of this file (its models: "
                                          f"{', '.join(models) or 'none'}) nor a file path or job:N{hint}")


def _keys(where: str, table: dict, allowed, required=()) -> None:
    if not isinstance(table, dict):
        raise InvalidArgument(f"{where} must be a table, got {table!r}")
    for key in table:
        if key not in allowed:
            raise _unknown_key(where, key, set(allowed))
    for key in required:
        if key not in table:
            raise InvalidArgument(f"{where}: missing key {key!r}")


def _unknown_key(where: str, key: str, allowed: set[str]) -> InvalidArgument:
    """The refusal of a key, with the closest known key, and the tables of models shown as ``[models.NAME]``."""
    close = difflib.get_close_matches(key, sorted(allowed), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    shown = sorted(allowed - {"models"}) + (["[models.NAME]"] if "models" in allowed else [])
    return InvalidArgument(f"{where}: unknown key {key!r}; {hint}expected one of {', '.join(shown)}")


def _table(data: dict, name: str) -> dict:
    table = data.get(name, {})
    if not isinstance(table, dict):
        raise InvalidArgument(f"[{name}] must be a table, got {table!r}")
    return table


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _uses(table: dict) -> list[str]:
    used = [table[k] for k in MODEL_REFERENCES + METHOD_REFERENCES if isinstance(table.get(k), str)]
    return used + [s for s in table.get("surrogates", []) if isinstance(s, str)]


def _model_order(models: dict) -> list[str]:
    """Models so that each comes after the models it uses; a cycle is an error."""
    order, visiting = [], set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise InvalidArgument(f"[models.{name}] uses itself through other models")
        visiting.add(name)
        _keys(f"[models.{name}]", models[name], _fields(TrainSpec) - {"dataset", "name"})
        for used in _uses(models[name]):
            if used in models:
                visit(used)
        order.append(name)

    for name in models:
        visit(name)
    return order


def _per_sigma(models: dict, order: list[str]) -> dict[str, bool]:
    per = {}
    for name in order:
        table = models[name]
        noisy = "sigma" not in table and table.get("objective") not in UNSMOOTHED
        per[name] = noisy or any(per.get(used, False) for used in _uses(table))
    return per


def _fields(spec_class) -> set[str]:
    return {f.name for f in dataclasses.fields(spec_class)} - {"kind"}


def _key(name: str, sigma: float | None) -> str:
    return name if sigma is None else f"{name}@{sigma:g}"


def _ref(value: str, sigma: float, per_sigma: dict) -> tuple[str, str | None]:
    """(spec value, needed step key) for a reference: a model of the file (a key of ``per_sigma``) or a path / job:N."""
    if value not in per_sigma:
        return value.replace("{sigma}", f"{sigma:g}"), None  # a checkpoint per sigma: cohen-{sigma}.pt
    key = _key(value, sigma if per_sigma[value] else None)
    return f"step:{key}", key


def _model_step(name: str, table: dict, sigma, per_sigma: dict, common: dict) -> tuple[str, Step]:
    fields, needs = {"target": "denoiser", **common, **table}, []
    for reference in MODEL_REFERENCES:
        if isinstance(fields.get(reference), str):
            fields[reference], need = _ref(fields[reference], sigma, per_sigma)
            needs += [need] if need else []
    if "surrogates" in fields:
        pairs = [_ref(s, sigma, per_sigma) for s in fields["surrogates"]]
        fields["surrogates"] = tuple(value for value, _ in pairs)
        needs += [need for _, need in pairs if need]
    if sigma is not None:
        fields["sigma"] = sigma
    elif table.get("objective") in UNSMOOTHED:
        fields.setdefault("sigma", 0.0)
    key = _key(name, sigma)
    label = name if sigma is None else f"{name} s={sigma:g}"
    try:
        spec = TrainSpec(name=label, **fields)
    except (DsqError, TypeError) as error:
        raise InvalidArgument(f"[models.{name}]: {error}") from None
    return key, Step(key, spec, needs, {"step": name, "sigma": fields.get("sigma")})


def _method_step(method: dict, certify: dict, sigma: float, models: dict, per_sigma: dict, common: dict) -> Step:
    label = method.get("label")
    where = f"[[methods]] {label!r}" if label else "[[methods]]"
    _keys(where, method, (_fields(CertifySpec) - {"dataset", "name", "sigma"}) | {"label"},
          required=("label", "classifier"))
    _keys("[certify]", certify, _fields(CertifySpec) - {"classifier", "denoiser", "name", "sigma"})
    fields = {**common, **certify, **{k: v for k, v in method.items() if k != "label"}}
    needs = []
    for reference in METHOD_REFERENCES:
        if isinstance(fields.get(reference), str):
            fields[reference], need = _ref(fields[reference], sigma, per_sigma)
            needs += [need] if need else []
    try:
        spec = CertifySpec(name=f"{label} s={sigma:g}", sigma=sigma, **fields)
    except (DsqError, TypeError) as error:
        raise InvalidArgument(f"{where}: {error}") from None
    return Step(f"{label}@{sigma:g}", spec, needs, {"method": label, "sigma": sigma})


def resolve(spec, ids: dict[str, int]):
    """The spec with ``step:KEY`` references replaced by ``job:N``."""
    def one(value):
        return f"job:{ids[value[5:]]}" if isinstance(value, str) and value.startswith("step:") else value

    changes = {name: one(getattr(spec, name)) for name in ("classifier", "denoiser", "init")
               if hasattr(spec, name)}
    if hasattr(spec, "surrogates"):
        changes["surrogates"] = tuple(one(s) for s in spec.surrogates)
    return dataclasses.replace(spec, **changes)


def submit(session, plan: Plan, settings, *, experiment: str, priority: int = 0,
           max_attempts: int | None = None, upload: bool = True, say=None) -> dict[str, int]:
    """Queue every job of the plan in one transaction; return job ids by step key. ``max_attempts``: of every job
    (default: the plan's); ``upload``, ``say``: as ``jobs.submit``'s.

    An experiment name already in the queue is refused: its results would be mixed with this run's.
    """
    from dsq import jobs
    from dsq.db import repo

    earlier = repo.list_jobs(session, limit=None, experiment=experiment)
    if earlier:
        ids = sorted(job.id for job in earlier)
        raise InvalidArgument(f"experiment {experiment!r} already has {len(ids)} jobs ({ids[0]}-{ids[-1]}): submit "
                              f"this run under another name (--name {experiment}-2)")
    ids: dict[str, int] = {}
    for step in plan.steps:
        meta = {**step.meta, "overrides": plan.overrides} if plan.overrides else step.meta
        job = jobs.submit(session, resolve(step.spec, ids), settings, priority=priority, experiment=experiment,
                          meta=meta, max_attempts=max_attempts or plan.max_attempts, upload=upload, say=say)
        ids[step.key] = job.id
    return ids


def describe(plan: Plan) -> list[str]:
    """The job graph with sample counts, for --dry-run (needs no data)."""
    lines, position = [], {step.key: i + 1 for i, step in enumerate(plan.steps)}
    total = 0
    for i, step in enumerate(plan.steps, 1):
        after = f"  after #{', #'.join(str(position[k]) for k in step.needs)}" if step.needs else ""
        spec = step.spec
        if isinstance(spec, TrainSpec):
            what = f"train    {spec.name}: {spec.target} {spec.arch} {spec.objective}, {spec.epochs} epochs"
        else:
            images = _images(spec)
            per_image = spec.n0 + spec.most_n  # sequential: at most
            samples = None if images is None else images * per_image
            total += samples or 0
            at_most = "at most " if spec.sequential else ""
            count = ("? images (folder)" if images is None
                     else f"{images} images x {at_most}{per_image:,} = {samples:,} samples")
            what = f"certify  {spec.name}: sigma {spec.sigma:g}, {count}"
        lines.append(f"#{i:<3} {what}{after}")
    trains = sum(isinstance(s.spec, TrainSpec) for s in plan.steps)
    lines.append(f"{len(plan.steps)} jobs ({trains} train, {len(plan.steps) - trains} certify); "
                 f"{total:,} Monte-Carlo samples to certify")
    if plan.overrides:
        lines.append(changed_by_set(plan.overrides))
    return lines


def missing_data(plan: Plan, settings) -> list[str]:
    """A line for each dataset of the plan that is not where its jobs would read it (a dry run says so)."""
    from dsq import datasets

    lines, seen = [], set()
    for step in plan.steps:
        spec = step.spec
        where = (spec.dataset, settings.data_root_of(spec))
        if where in seen:
            continue
        seen.add(where)
        try:
            datasets.get_dataset(spec.dataset, "test", root=where[1], size=spec.size)
        except DsqError as error:
            lines.append(f"warning: {error} (submitting this plan would be refused)")
    return lines


def _images(spec: CertifySpec) -> int | None:
    size = TEST_IMAGES.get(spec.dataset) if spec.split == "test" else None
    if size is None:
        return None
    images = math.ceil(size / spec.skip)
    return min(images, spec.max_images) if spec.max_images else images
