"""Models dsq did not write: TorchScript files, torchvision architectures and the user's own code.

Besides ``job:N`` and checkpoint files, a model reference (``--classifier``, ``--denoiser``,
``--surrogate``) may be:

* a TorchScript file (``torch.jit.save``), told apart from a checkpoint by its content and read
  with ``torch.jit.load``: its code is TorchScript, run by torch's interpreter, never unpickled Python;
* ``torchvision:NAME``: torchvision's architecture NAME (``torchvision.models.get_model``) with the
  user's weights; ``num_classes`` is read from the weights unless the arguments give it;
* ``package.module:function``: a function of the user's own code that returns an ``nn.Module``. Naming
  it is the explicit opt-in to import that module; it must be importable wherever the job runs
  (installed, or on ``PYTHONPATH``). The weights are loaded into what it returns, when given. A denoiser's
  function may return a diffusion model instead (``dsq.diffusion.as_diffusion``: an ε-model and its
  ``alphas_cumprod``); the weights then go to the ε-model;
* ``diffusers:DIR``: a diffusion model folder in the format of the ``diffusers`` library (``dsq.diffusion``).

Each such reference has options (``spec.models[reference]``): ``weights`` (a state dict saved with
``torch.save``, read with ``weights_only=True``), ``args`` (keyword arguments of the architecture, a
JSON object), and ``mean``/``std``: a classifier's normalization, applied by a ``NormalizeLayer`` in
front of it. Without them a TorchScript or factory classifier receives pixels in [0, 1] as they are;
a torchvision one gets ImageNet's normalization (the one torchvision's own weights expect). A
denoiser works in [0, 1] pixels and takes no normalization. dsq checkpoints carry their own
architecture and normalization, so they take no options.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import math
import os
import re
import sys
import warnings
import zipfile
from pathlib import Path

from dsq import checks
from dsq.errors import CheckpointError, InvalidArgument

TORCHVISION = "torchvision:"
DIFFUSERS = "diffusers:"
FACTORY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
OPTION_KEYS = ("weights", "args", "mean", "std", "code", "files")
IMAGENET_NORMALIZATION = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def form(reference: str) -> str:
    """``job``, ``torchvision``, ``diffusers`` (a diffusers model folder), ``factory`` or ``file`` (a checkpoint or
    TorchScript file)."""
    if reference.startswith("job:"):
        return "job"
    if reference.startswith(TORCHVISION):
        return "torchvision"
    if reference.startswith(DIFFUSERS):
        return "diffusers"
    return "factory" if FACTORY.match(reference) and not os.path.isfile(reference) else "file"


def check_options(reference: str, options, role: str) -> dict:
    """The options of ``reference`` as plain data, checked for their shape (files are checked at submit)."""
    if not isinstance(options, dict) or set(options) - set(OPTION_KEYS):
        raise InvalidArgument(f"options of model {reference} must be a table with keys among "
                              f"{', '.join(OPTION_KEYS)}, got {options!r}")
    kind = form(reference)
    given = {key: value for key, value in options.items() if value not in (None, {}, [])}
    if kind == "job" and given:
        raise InvalidArgument(f"{reference} is a dsq checkpoint: it carries its architecture, weights and "
                              f"normalization, so {', '.join(sorted(given))} cannot be given for it")
    if kind == "diffusers" and set(given) - {"files"}:
        raise InvalidArgument(f"{reference} is a diffusers model folder: it carries its config, weights and noise "
                              f"schedule, so {', '.join(sorted(set(given) - {'files'}))} cannot be given for it")
    if kind == "diffusers" and role != "denoiser":
        raise InvalidArgument(f"{reference} is a diffusion model: it can only be a denoiser, not a {role}")
    weights, args = options.get("weights"), options.get("args") or {}
    if weights is not None and (not isinstance(weights, str) or not weights):
        raise InvalidArgument(f"weights of {reference} must be a file path, got {weights!r}")
    if kind == "file" and (weights or args):
        raise InvalidArgument(f"--*-weights and --*-args are for torchvision:NAME and package.module:function "
                              f"models; {reference} is a file that holds its own weights")
    if kind == "torchvision" and not weights:
        raise InvalidArgument(f"{reference} needs its weights: give a state dict file (--classifier-weights or "
                              f"--denoiser-weights); dsq downloads nothing")
    if not isinstance(args, dict) or not all(isinstance(key, str) for key in args):
        raise InvalidArgument(f"args of {reference} must be a JSON object, got {args!r}")
    normalization = _normalization(reference, options.get("mean"), options.get("std"))
    if normalization and role != "classifier":
        raise InvalidArgument(f"--mean/--std are a classifier's normalization; a {role} works in [0, 1] pixels")
    code, files = options.get("code"), options.get("files")
    if code is not None and (kind != "factory" or not isinstance(code, str)):
        raise InvalidArgument(f"code of {reference} must be the folder its module was found in, got {code!r}")
    if files is not None and (not isinstance(files, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) for k, v in files.items())):
        raise InvalidArgument(f"files of {reference} must map file paths to their sha256, got {files!r}")
    return {"weights": weights, "args": dict(args), **(normalization or {}), **({"code": code} if code else {}),
            **({"files": dict(files)} if files else {})}


def locate(reference: str) -> str | None:
    """The folder on ``sys.path`` that ``package.module`` of a function reference is imported from, now.

    dsq records it at submit, so a worker on this machine (or one that shares the folder) imports the same
    code without its own ``PYTHONPATH``. Finding a submodule imports its parent packages.
    """
    module = reference.partition(":")[0]
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.origin or not os.path.isfile(found.origin):
        raise InvalidArgument(f"{reference}: cannot import {module}: not found on PYTHONPATH or among the installed "
                              f"packages")
    depth = module.count(".") + (1 if os.path.basename(found.origin) == "__init__.py" else 0)
    return str(Path(found.origin).resolve().parents[depth])


def pin(spec):
    """``spec`` with what its models were checked with, recorded at submit: the sha256 of each local model file
    (``files``: a file changed before the job runs is refused, ``verify``) and the folder each
    ``package.module:function`` is imported from (``code``, ``locate``)."""
    from dsq import artifacts

    models = getattr(spec, "models", None)
    if models is None:
        return spec
    pinned = {}
    for reference, _ in spec.model_roles():
        kind, options = form(reference), dict(models.get(reference, {}))
        if kind == "factory" and "code" not in options:
            options["code"] = locate(reference)
        paths = ([reference] if kind == "file" else []) + ([options["weights"]] if options.get("weights") else [])
        if kind == "diffusers":
            from dsq import diffusion

            paths += diffusion.diffusers_files(reference[len(DIFFUSERS):])
        files = {path: artifacts.file_sha256(path) for path in paths if os.path.isfile(path)}
        if files and "files" not in options:
            options["files"] = files
        if options:
            pinned[reference] = options
    return spec if pinned == models else dataclasses.replace(spec, models=pinned)


def verify(options: dict) -> None:
    """Refuse a model file whose bytes are not those the job was submitted with (``pin``)."""
    from dsq import artifacts

    for path, expected in (options or {}).get("files", {}).items():
        found = artifacts.file_sha256(path)
        if found != expected:
            raise CheckpointError(f"{path} changed after the job was submitted (sha256 {expected[:12]}... then, "
                                  f"{found[:12]}... now): submit a new job to certify the new file")


def _normalization(reference: str, mean, std) -> dict | None:
    if mean is None and std is None:
        return None
    if mean is None or std is None:
        raise InvalidArgument(f"give both --mean and --std for {reference} (one value per channel each)")
    values = []
    for name, numbers in (("mean", mean), ("std", std)):
        if (not isinstance(numbers, (list, tuple)) or not numbers or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in numbers)):
            raise InvalidArgument(f"{name} of {reference} must be finite numbers, one per channel, got {numbers!r}")
        values.append([float(v) for v in numbers])
    if len(values[0]) != len(values[1]):
        raise InvalidArgument(f"mean and std of {reference} must have one value per channel each, got "
                              f"{len(values[0])} and {len(values[1])}")
    if not all(s > 0 for s in values[1]):
        raise InvalidArgument(f"every std of {reference} must be > 0, got {values[1]}")
    return {"mean": values[0], "std": values[1]}


def parse_numbers(text: str | None, name: str) -> list[float] | None:
    """``0.5,0.5,0.5`` (a command-line --mean/--std) as numbers; None for None."""
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise InvalidArgument(f"--{name} must be comma-separated numbers (one per channel), got {text!r}") from None


def is_torchscript(path: str) -> bool:
    """Whether ``path`` is a ``torch.jit.save`` archive (it holds ``constants.pkl`` and ``code/``)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(name.endswith("/constants.pkl") for name in names) and any("/code/" in name for name in names)


def load(reference: str, path: str | None, options: dict, role: str, device="cpu"):
    """The model a user reference names, in eval mode on ``device`` (``path``: the local file of a file form)."""
    import torch

    options = options or {}
    kind = form(reference)
    if kind == "file":
        model = _load_torchscript(path, device)
    else:
        weights = _read_state_dict(reference, options["weights"]) if options.get("weights") else None
        model = _build(reference, kind, options, weights)
        if not isinstance(model, torch.nn.Module):  # a diffusion model: its ε-model takes the weights
            if weights is not None:
                _load_weights(model.eps_model, reference, options["weights"], weights)
            model.eps_model = _frozen(model.eps_model, device)
            return model
        if weights is not None:
            _load_weights(model, reference, options["weights"], weights)
    normalization = _normalization(reference, options.get("mean"), options.get("std"))
    if normalization is None and kind == "torchvision" and role == "classifier":
        normalization = IMAGENET_NORMALIZATION
    if normalization is not None:
        from dsq.classifiers import NormalizeLayer

        model = torch.nn.Sequential(NormalizeLayer(normalization["mean"], normalization["std"]), model)
    return _frozen(model, device)


def _frozen(model, device):
    """The model on ``device`` in eval mode, its parameters frozen: dsq never trains a user's model (and a frozen
    model copies cleanly)."""
    import torch

    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.to(torch.device(device)).eval()


def _load_torchscript(path: str, device):
    import torch

    try:
        with warnings.catch_warnings():  # torch 2.14 marks TorchScript deprecated; it loads all the same
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(path, map_location=torch.device(device))
    except Exception as error:  # noqa: BLE001 - torch reports a broken archive with many exception types
        first = checks.first_line(error, 160)
        raise CheckpointError(f"{path}: TorchScript file does not load ({first})") from None


def _build(reference: str, kind: str, options: dict, weights: dict | None):
    """The model built from its ``args``; a torchvision one takes ``num_classes`` from ``weights`` unless given."""
    import torch

    args = dict(options.get("args") or {})
    if kind == "torchvision":
        import torchvision

        name = reference[len(TORCHVISION):]
        if name not in torchvision.models.list_models():
            raise InvalidArgument(f"{reference}: torchvision has no model {name!r} (see "
                                  f"torchvision.models.list_models())")
        classes = _classes_in(weights) if weights is not None and "num_classes" not in args else None
        if classes is not None:
            args["num_classes"] = classes
        make = functools.partial(torchvision.models.get_model, name, weights=None)
    else:
        make = _function(reference, options.get("code"))
    try:
        model = make(**args)
    except Exception as error:  # noqa: BLE001 - the user's code, or a wrong argument
        raise InvalidArgument(f"{reference} with arguments {args}: {type(error).__name__}: {error}") from None
    if isinstance(model, torch.nn.Module):
        return model
    from dsq import diffusion

    found = diffusion.as_diffusion(model)
    if found is None:
        raise InvalidArgument(f"{reference} returned {type(model).__name__}, not a torch.nn.Module nor a diffusion "
                              f"model (an (eps_model, alphas_cumprod) pair)")
    return found


def _function(reference: str, code: str | None):
    """The function ``package.module:function`` names, imported (from ``code`` when installed packages lack it)."""
    module_name, _, function_name = reference.partition(":")
    if code and code not in sys.path:
        sys.path.append(code)  # after the installed packages: what the submitter imported
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 - the user's module may fail in any way while importing
        raise InvalidArgument(f"{reference}: cannot import {module_name} ({type(error).__name__}: {error}); "
                              f"it must be importable where the job runs (installed or on PYTHONPATH)") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise InvalidArgument(f"{reference}: {module_name} has no function {function_name}")
    return function


def _read_state_dict(reference: str, path: str) -> dict:
    import torch

    from dsq import checkpoints

    raw, _ = checkpoints.read(path)  # a safe load; one line on why a file is refused
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict) or not raw or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in raw.items()):
        raise CheckpointError(f"weights of {reference} ({path}) must be a state dict (parameter names to "
                              f"tensors), as torch.save(model.state_dict(), FILE) writes")
    return checkpoints.strip_prefix(raw, "module.")  # saved from DataParallel


def _classes_in(state_dict: dict) -> int | None:
    """The outputs of the last linear layer (the classes) in a classifier's weights."""
    last = [value for key, value in state_dict.items() if key.endswith(".weight") and value.ndim == 2]
    return int(last[-1].shape[0]) if last else None


def _load_weights(model, reference: str, path: str, state_dict: dict) -> None:
    from dsq import checkpoints

    problem = checkpoints.mismatch(model.state_dict(), state_dict)
    if problem:
        raise CheckpointError(f"weights {path} do not fit {reference}: {problem}")
    model.load_state_dict(state_dict, strict=False)  # strict but for BatchNorm's optional counters
