"""Checkpoints: the one place models are written to or read from disk.

A dsq checkpoint is a self-describing dict saved with ``torch.save``::

    {"format": "dsq-checkpoint", "version": 1, "kind": "denoiser" | "classifier",
     "arch": str, "arch_kwargs": dict, "normalization": {"mean": [...], "std": [...]} | None,
     "training_spec": dict, "metrics": dict, "state_dict": {name: tensor},
     "diffusion": {"schedule", "timesteps", "beta_start", "beta_end"}}   # a DDPM only

* A DDPM (``dsq submit train --objective diffusion``) is a denoiser of arch ``unet`` (the ε-model) with its
  noise schedule under ``diffusion``; ``load_model`` returns it as a ``dsq.diffusion.DiffusionModel``.

It holds only tensors and plain data, so it loads with ``torch.load(weights_only=True)``.

* Denoisers: ``arch_kwargs`` are the keyword arguments of ``build_denoiser`` (``in_channels``
  and e.g. ``depth``/``width``); ``normalization`` is None (a denoiser works in [0, 1]).
* Classifiers: ``arch_kwargs`` are ``{"num_classes", "in_channels"}``; ``normalization`` is
  required, and the state dict is that of the whole ``Sequential(NormalizeLayer, net)``, so
  it contains ``0.means`` / ``0.sds`` (which equal ``normalization``) and ``1.<net keys>``.
  Saving it whole means the normalization a classifier was trained with can never be lost
  or swapped: a strict load restores it bit for bit.

Checkpoints of the reference implementations (Cohen et al.'s locuslab/smoothing,
microsoft/denoised-smoothing) — dicts with ``arch`` and ``state_dict``, keys possibly
prefixed ``module.`` (DataParallel) and, for classifiers, ``0.``/``1.`` (a Sequential of
their NormalizeLayer and the net) — load too: the architecture, normalization and number
of classes are inferred from the reference's architecture name and the tensor shapes.
"""

from __future__ import annotations

import hashlib
import io
import numbers
import os
import pickle
import tempfile
import warnings
import zipfile
from types import SimpleNamespace

import torch
from torch import nn

from dsq import checks
from dsq import artifacts
from dsq.classifiers import NormalizeLayer, build_classifier
from dsq.denoisers import build_denoiser
from dsq.errors import CheckpointError, DsqError, InvalidArgument

FORMAT = "dsq-checkpoint"
VERSION = 1  # of dsq's checkpoint format: raised when its keys change, so an older dsq refuses a newer file
KINDS = ("denoiser", "classifier")

CIFAR10_NORMALIZATION = {"mean": [0.4914, 0.4822, 0.4465], "std": [0.2023, 0.1994, 0.2010]}
IMAGENET_NORMALIZATION = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}

# Reference architecture name -> (dsq arch, normalization, default number of classes).
# Denoisers: microsoft/denoised-smoothing's DENOISERS_ARCHITECTURES (+ the bare names).
REFERENCE_DENOISERS = {
    "dncnn": "dncnn", "cifar_dncnn": "dncnn", "imagenet_dncnn": "dncnn",
    "dncnn_wide": "dncnn_wide", "cifar_dncnn_wide": "dncnn_wide",
    "memnet": "memnet", "imagenet_memnet": "memnet",
}
# Classifiers: Cohen et al.'s ARCHITECTURES and denoised-smoothing's that dsq builds.
REFERENCE_CLASSIFIERS = {
    "cifar_resnet20": ("cifar_resnet20", CIFAR10_NORMALIZATION, 10),
    "cifar_resnet110": ("cifar_resnet110", CIFAR10_NORMALIZATION, 10),
    "cifar_wrn": ("wrn28_10", CIFAR10_NORMALIZATION, 10),
    "imagenet32_resnet110": ("cifar_resnet110", IMAGENET_NORMALIZATION, 1000),
    "imagenet32_wrn": ("wrn28_10", IMAGENET_NORMALIZATION, 1000),
    "resnet18": ("resnet18", IMAGENET_NORMALIZATION, 1000),
    "resnet34": ("resnet34", IMAGENET_NORMALIZATION, 1000),
    "resnet50": ("resnet50", IMAGENET_NORMALIZATION, 1000),
}
_HEAD_KEYS = ("fc.weight", "classifier.weight")  # last linear layer: [num_classes, features]


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes; a file that cannot be read is a one-line CheckpointError."""
    return artifacts.file_sha256(path)


# ----------------------------------------------------------------------------- building
_REQUIRED_ARCH_KWARGS = {"denoiser": ("in_channels",), "classifier": ("num_classes", "in_channels")}


def build_model(kind: str, arch: str, arch_kwargs: dict, normalization: dict | None) -> nn.Module:
    """Freshly initialised model of ``kind`` described by arch, its kwargs and normalization."""
    if kind not in KINDS:
        raise InvalidArgument(f"checkpoint kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(arch_kwargs, dict) or not all(k in arch_kwargs for k in _REQUIRED_ARCH_KWARGS[kind]):
        raise InvalidArgument(f"arch_kwargs of a {kind} must be a dict with at least "
                              f"{list(_REQUIRED_ARCH_KWARGS[kind])}, got {arch_kwargs!r}")
    if kind == "denoiser":
        kwargs = dict(arch_kwargs)
        return build_denoiser(arch, kwargs.pop("in_channels"), **kwargs)
    if not isinstance(normalization, dict) or set(normalization) != {"mean", "std"}:
        raise InvalidArgument(f"a classifier needs its normalization {{'mean': [...], 'std': [...]}}, "
                              f"got {normalization!r}")
    kwargs = {k: v for k, v in arch_kwargs.items() if k != "pretrained"}
    return build_classifier(arch, **kwargs, mean=normalization["mean"], std=normalization["std"])


def _plain(value, where: str):
    """Copy of ``value`` as plain data (dict/list/str/int/float/bool/None) or InvalidArgument."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, dict):
        if not all(isinstance(key, str) for key in value):
            raise InvalidArgument(f"{where}: dictionary keys must be strings, got {list(value)}")
        return {key: _plain(item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise InvalidArgument(f"{where}: {type(value).__name__} cannot be stored in a checkpoint; "
                          f"use numbers, strings, lists and dicts")


def _normalization_of(model: nn.Module, normalization: dict | None) -> dict:
    """The classifier's normalization: the one given, checked against its NormalizeLayer."""
    layer = model[0] if isinstance(model, nn.Sequential) and len(model) else None
    if not isinstance(layer, NormalizeLayer):
        raise InvalidArgument("a classifier must be Sequential(NormalizeLayer, net), as build_classifier makes")
    inside = {"mean": layer.means.tolist(), "std": layer.sds.tolist()}
    if normalization is None:
        return inside
    given = _plain(normalization, "normalization")
    if set(given) != {"mean", "std"} or not all(
            torch.allclose(torch.tensor(given[k], dtype=torch.float32), getattr(layer, attr).cpu())
            for k, attr in (("mean", "means"), ("std", "sds"))):
        raise InvalidArgument(f"normalization {given} differs from the classifier's own layer {inside}")
    return given


# ----------------------------------------------------------------------------- saving
def save_checkpoint(path: str | os.PathLike, *, kind: str, arch: str, arch_kwargs: dict,
                    model: nn.Module, normalization: dict | None, training_spec: dict,
                    metrics: dict, diffusion: dict | None = None) -> str:
    """Write a self-describing checkpoint atomically; return the sha256 of its bytes.

    The description is checked before writing: ``arch`` + ``arch_kwargs`` (+ normalization)
    must rebuild a model with exactly the state-dict keys and shapes of ``model``.
    """
    arch_kwargs = _plain(arch_kwargs, "arch_kwargs")
    if kind == "classifier":
        normalization = _normalization_of(model, normalization)
    elif normalization is not None:
        normalization = _plain(normalization, "normalization")
    state_dict = {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
    with torch.device("meta"):
        blueprint = build_model(kind, arch, arch_kwargs, normalization)
    problem = mismatch(blueprint.state_dict(), state_dict)
    if problem:
        raise InvalidArgument(f"model does not match arch {arch!r} with {arch_kwargs}: {problem}")
    payload = {
        "format": FORMAT, "version": VERSION, "kind": kind, "arch": arch,
        "arch_kwargs": arch_kwargs, "normalization": normalization,
        "training_spec": _plain(training_spec, "training_spec"),
        "metrics": _plain(metrics, "metrics"), "state_dict": state_dict,
        **({"diffusion": _plain(diffusion, "diffusion")} if diffusion else {}),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    _write_atomically(os.fspath(path), data)
    return hashlib.sha256(data).hexdigest()


def _write_atomically(path: str, data: bytes) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temp_path = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(handle, "wb") as temp:
            temp.write(data)
            temp.flush()
            os.fsync(temp.fileno())
        os.replace(temp_path, path)
    except BaseException:
        if os.path.exists(temp_path):
            os.remove(temp_path)
        raise


# ----------------------------------------------------------------------------- loading
def load_checkpoint(path: str | os.PathLike, device="cpu") -> tuple[nn.Module, dict]:
    """Load a dsq or reference checkpoint: (model in eval mode on ``device``, metadata).

    The metadata is the checkpoint without its state dict, plus ``sha256`` of the file
    bytes. For a reference checkpoint it is the inferred description, in the same shape
    (``format`` is ``"reference"`` and ``reference_arch`` keeps the original name).
    """
    raw, sha256 = read(os.fspath(path))
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a checkpoint dict, found {type(raw).__name__}")
    if raw.get("format") == FORMAT:
        metadata, state_dict = _dsq_parts(path, raw)
    elif "arch" in raw and "state_dict" in raw:
        metadata, state_dict = _reference_parts(path, raw)
    else:
        raise CheckpointError(f"{path}: not a dsq checkpoint (format {FORMAT!r}) nor a reference "
                              f"one (keys 'arch' and 'state_dict'); found keys {sorted(map(str, raw))}")
    model = _restore(path, metadata, state_dict)
    metadata["sha256"] = sha256
    return _to_device(model, device), metadata


def load_model(path: str | os.PathLike, device="cpu"):
    """The model of a checkpoint file: ``load_checkpoint``'s, or a DiffusionModel for a DDPM dsq trained."""
    model, metadata = load_checkpoint(path, device)
    if not metadata.get("diffusion"):
        return model
    from dsq import diffusion

    kwargs = metadata["arch_kwargs"]
    return diffusion.DiffusionModel(model, diffusion.schedule_alphas(metadata["diffusion"]),
                                    channels=kwargs["in_channels"], sample_size=kwargs.get("sample_size"),
                                    about=metadata["diffusion"])


def read(path: str) -> tuple[object, str]:
    """(what ``torch.load(weights_only=True)`` reads from ``path``, the file's sha256); CheckpointError otherwise."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise CheckpointError(f"checkpoint {path} cannot be read: {artifacts.os_reason(error)}") from None
    try:
        with warnings.catch_warnings():  # torch warns of a newer pickle protocol, then refuses it: refusal says so
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            raw = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(refusal(path, data, error)) from None
    return raw, hashlib.sha256(data).hexdigest()


# How to turn a file one trusts into one a safe load reads (its architecture name and weights are what dsq needs).
CONVERT = ("if you trust the file, convert it once in a trusted session: c = torch.load(PATH, weights_only=False), "
           "then torch.save({'arch': ARCH, 'state_dict': STATE}, NEW) with its architecture name and state_dict "
           "(model.state_dict() for a whole model), or re-save the model with dsq.checkpoints.save_checkpoint")


def refusal(path: str, data: bytes, error: Exception) -> str:
    """One line saying why ``torch.load(weights_only=True)`` refused ``data``: Python objects, or a broken file.

    torch's message alone cannot tell them apart (random bytes also fail as 'unsupported' pickle operations,
    and a cut file fails on its objects before its end), so a refused file is loaded once more for its
    structure only, with every Python object replaced by an inert stand-in.
    """
    objects, broken = _pickled_objects(data)
    if broken is not None:
        return (f"{path} is not a readable torch checkpoint: {_load_failure(broken)}; "
                f"expected a file written by torch.save holding tensors and plain data")
    if objects:
        shown = ", ".join(objects[:3]) + (f" and {len(objects) - 3} more" if len(objects) > 3 else "")
        return (f"{path} holds Python objects ({shown}) that a safe load (torch.load weights_only=True) "
                f"refuses; {CONVERT}")
    protocol = _pickle_protocol(data)
    if protocol is not None and protocol > 2:
        return (f"{path} uses pickle protocol {protocol}, which a safe load (torch.load weights_only=True) does "
                f"not read; if you trust the file, re-save it once in a trusted session: "
                f"torch.save(torch.load(PATH, weights_only=False), NEW) (torch.save's default protocol is 2)")
    return (f"{path} is not a readable torch checkpoint: {_load_failure(error)}; "
            f"expected a file written by torch.save holding tensors and plain data")


def _load_failure(error: Exception) -> str:
    """Why a load failed, in a few words (torch's own messages span many lines)."""
    message = str(error)
    if "WeightsUnpickler" in message or "magic number" in message:
        return "the file is corrupt or not a torch.save file"
    first_line = checks.first_line(message, 120) or "unexpected end of file"
    return f"the file is truncated or corrupt ({type(error).__name__}: {first_line})"


def _pickled_objects(data: bytes) -> tuple[list[str], Exception | None]:
    """(names of the Python objects pickled in a torch.save file, why the file does not load at all or None).

    The file is loaded through an unpickler that resolves only the globals a weights-only load allows;
    every other class or function becomes an inert stand-in that records its name (none of its code runs).
    """
    found: list[str] = []
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=False, pickle_module=_recording_pickle(found))
    except Exception as error:
        return list(dict.fromkeys(found)), error
    return list(dict.fromkeys(found)), None


def _recording_pickle(found: list[str]) -> SimpleNamespace:
    """A ``pickle`` module for torch.load whose unpickler records and stubs every global it does not allow."""
    from torch import _weights_only_unpickler as safe

    allowed = {**safe._get_allowed_globals(), **safe._get_user_allowed_globals()}

    class RecordingUnpickler(pickle.Unpickler):
        def find_class(self, module, name):
            full_name = f"{module}.{name}"
            if full_name in allowed:
                return allowed[full_name]
            found.append(full_name)
            return type(name, (_Inert,), {})

    def load(file, **options):
        return RecordingUnpickler(file, **options).load()

    return SimpleNamespace(__name__="pickle", Unpickler=RecordingUnpickler, load=load)


class _Inert:
    """Stands in for a pickled object while a refused file's structure is read: accepts anything, runs nothing."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, item):
        pass

    def extend(self, items):
        pass


def _pickle_protocol(data: bytes) -> int | None:
    """The pickle protocol of a torch.save file (zip: its ``data.pkl``; legacy: the file itself)."""
    stream = data
    if zipfile.is_zipfile(io.BytesIO(data)):
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
                stream = archive.read(name)[:2]
        except (zipfile.BadZipFile, StopIteration, OSError):
            return None
    return stream[1] if len(stream) > 1 and stream[0] == pickle.PROTO[0] else None


def _dsq_parts(path, raw: dict) -> tuple[dict, dict]:
    if raw.get("version") != VERSION:
        raise CheckpointError(f"{path}: dsq checkpoint version {raw.get('version')!r} is not "
                              f"supported; this dsq reads version {VERSION}")
    required = ("kind", "arch", "arch_kwargs", "normalization", "state_dict")
    missing = [key for key in required if key not in raw]
    if missing:
        raise CheckpointError(f"{path}: dsq checkpoint lacks {missing}; expected keys {list(required)}")
    metadata = {key: value for key, value in raw.items() if key != "state_dict"}
    return metadata, _checked_state_dict(path, raw["state_dict"])


def _reference_parts(path, raw: dict) -> tuple[dict, dict]:
    reference_arch = raw["arch"]
    state_dict = strip_prefix(_checked_state_dict(path, raw["state_dict"]), "module.")
    if reference_arch in REFERENCE_DENOISERS:
        arch = REFERENCE_DENOISERS[reference_arch]
        metadata = {"kind": "denoiser", "arch": arch, "normalization": None,
                    "arch_kwargs": _denoiser_kwargs(arch, state_dict)}
    elif reference_arch in REFERENCE_CLASSIFIERS:
        arch, normalization, classes = REFERENCE_CLASSIFIERS[reference_arch]
        state_dict, normalization = _sequential_classifier_state(state_dict, normalization)
        metadata = {"kind": "classifier", "arch": arch, "normalization": normalization,
                    "arch_kwargs": {"num_classes": _num_classes(state_dict, classes),
                                    "in_channels": len(normalization["mean"])}}
    else:
        known = sorted(REFERENCE_DENOISERS) + sorted(REFERENCE_CLASSIFIERS)
        raise CheckpointError(f"{path}: unknown reference architecture {reference_arch!r}; known: {', '.join(known)}")
    metadata = {"format": "reference", "version": None, "reference_arch": reference_arch,
                **metadata, "training_spec": {}, "metrics": {}}
    if "epoch" in raw:
        metadata["epoch"] = raw["epoch"]
    return metadata, state_dict


def _checked_state_dict(path, state_dict) -> dict:
    if not isinstance(state_dict, dict) or not all(
            isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state_dict.items()):
        raise CheckpointError(f"{path}: 'state_dict' must map parameter names (str) to tensors")
    return state_dict


def strip_prefix(state_dict: dict, prefix: str) -> dict:
    if state_dict and all(str(key).startswith(prefix) for key in state_dict):
        return {key[len(prefix):]: value for key, value in state_dict.items()}
    return state_dict


def _denoiser_kwargs(arch: str, state_dict: dict) -> dict:
    """in_channels (and DnCNN's depth/width) read from the first convolution's shape."""
    if arch in ("dncnn", "dncnn_wide") and _is_tensor(state_dict.get("dncnn.0.weight"), 4):
        width, in_channels = state_dict["dncnn.0.weight"].shape[:2]
        depth = sum(1 for key in state_dict if key.startswith("dncnn.") and key.endswith(".weight")
                    and state_dict[key].ndim == 4)
        return {"in_channels": int(in_channels), "depth": depth, "width": int(width)}
    if arch == "memnet" and _is_tensor(state_dict.get("feature_extractor.bn.weight"), 1):
        return {"in_channels": int(state_dict["feature_extractor.bn.weight"].shape[0])}
    return {"in_channels": 3}


def _sequential_classifier_state(state_dict: dict, normalization: dict) -> tuple[dict, dict]:
    """Map a reference classifier's keys onto ``Sequential(NormalizeLayer, net)``.

    Cohen et al.'s NormalizeLayer keeps ``means``/``sds`` as plain attributes, so their
    state dicts hold only ``1.<net>`` (``1.module.<net>`` under DataParallel); the
    normalization then comes from the dataset the architecture name implies.
    """
    if all(str(key).startswith(("0.", "1.")) for key in state_dict):
        net = {key[2:]: value for key, value in state_dict.items() if key.startswith("1.")}
        norm = {key[2:]: value for key, value in state_dict.items() if key.startswith("0.")}
    else:
        net, norm = state_dict, {}
    net = strip_prefix(net, "module.")
    if _is_tensor(norm.get("means"), 1) and _is_tensor(norm.get("sds"), 1):
        normalization = {"mean": norm["means"].tolist(), "std": norm["sds"].tolist()}
    means = torch.tensor(normalization["mean"], dtype=torch.float32)
    sds = torch.tensor(normalization["std"], dtype=torch.float32)
    mapped = {"0.means": means, "0.sds": sds}
    mapped.update({f"1.{key}": value for key, value in net.items()})
    return mapped, normalization


def _num_classes(state_dict: dict, default: int) -> int:
    for key in _HEAD_KEYS:
        if _is_tensor(state_dict.get(f"1.{key}"), 2):
            return int(state_dict[f"1.{key}"].shape[0])
    return default


def _is_tensor(value, ndim: int) -> bool:
    return isinstance(value, torch.Tensor) and value.ndim == ndim


def _restore(path, metadata: dict, state_dict: dict) -> nn.Module:
    try:
        model = build_model(metadata["kind"], metadata["arch"], metadata["arch_kwargs"],
                            metadata["normalization"])
    except (DsqError, TypeError, ValueError, KeyError, AttributeError) as error:
        raise CheckpointError(f"{path}: cannot rebuild the model it describes "
                              f"({type(error).__name__}: {error})") from None
    problem = mismatch(model.state_dict(), state_dict)
    if problem:
        raise CheckpointError(f"{path}: state dict does not match {metadata['kind']} "
                              f"{metadata['arch']!r} with {metadata['arch_kwargs']}: {problem}")
    try:
        model.load_state_dict(state_dict, strict=True)
    except Exception as error:
        first_line = checks.first_line(error)
        raise CheckpointError(f"{path}: state dict does not load: {first_line}") from None
    return model.eval()


def mismatch(expected: dict, found: dict) -> str:
    """One line describing how ``found`` differs from ``expected`` ('' when it matches).

    BatchNorm's ``num_batches_tracked`` may be absent (old checkpoints); torch fills it.
    """
    optional = {key for key in expected if key.endswith("num_batches_tracked")}
    missing = [key for key in expected if key not in found and key not in optional]
    unexpected = [key for key in found if key not in expected]
    wrong = [key for key in expected if key in found and (
        not isinstance(found[key], torch.Tensor) or found[key].shape != expected[key].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {missing[0]!r})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]!r})")
    if wrong:
        key = wrong[0]
        got = tuple(found[key].shape) if isinstance(found[key], torch.Tensor) else type(found[key]).__name__
        parts.append(f"{len(wrong)} shape mismatches (e.g. {key!r}: checkpoint {got}, "
                     f"architecture {tuple(expected[key].shape)})")
    return "; ".join(parts)


def _to_device(model: nn.Module, device) -> nn.Module:
    try:
        return model.to(torch.device(device))
    except (RuntimeError, AssertionError, TypeError) as error:
        raise InvalidArgument(f"cannot move the model to device {device!r}: {error}") from None
