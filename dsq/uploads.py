"""Files a job names by path, carried to the nodes that run it through the artifact store.

At submit (``jobs.submit``), each local file or folder a spec names is put in the artifact store under the
sha256 of its bytes: model files (a TorchScript or checkpoint file, a ``--*-weights`` state dict), PREDICT's
input images, the folders of a ``folder:`` dataset and a ``data_root`` the dataset is read from. A folder
travels as one bundle: a tar of its files and subfolders in name order, without times or owners, so that the
same folder is the same bytes, and the same sha256, at every submit. The spec records where each lives
(``spec.uploads``: the path as given -> its ``location`` and ``sha256``); the paths themselves stay in the spec,
as the user gave them.

Where a job runs, the process that reads a path reads the store's copy instead, always: the file from
``artifacts.fetch`` (cached by sha256 under ``$DSQ_HOME/cache/artifacts``, its hash checked each time), a folder
unpacked once into ``$DSQ_HOME/cache/uploads/<sha256>/``. Always, not only when the path is missing on the
node: a path that exists there may hold other bytes (another machine's ``/tmp/model.pt``, or a file edited
since), and the store's copy is the one the job was submitted with; after the first job the cache makes it a
hash of a local file.

Only an S3 store is uploaded to. A local store is a folder of the machine that submits: jobs read from it
only where they can read the submitter's paths as well, so uploading would only copy files, and the paths are
read as given (as with ``--no-upload``, for data on storage every node shares). A ``diffusers:DIR`` model travels
as a folder bundle too; the code folder of a ``package.module:function`` does not (install it on every node).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from dsq import artifacts, usermodels
from dsq.errors import ArtifactStoreError, CheckpointError, InvalidArgument

FOLDER_PREFIX = "folder:"
ROOTED = ("cifar10", "imagenet", "folder")  # the datasets read from a data_root


def local_paths(spec) -> list[tuple[str, bool]]:
    """(path, is a folder) for each local file and folder the spec names, in a fixed order, without repeats."""
    found: dict[str, bool] = {}
    for reference, _ in spec.model_roles():
        kind = usermodels.form(reference)
        weights = (getattr(spec, "models", {}).get(reference) or {}).get("weights")
        for path in ([reference] if kind == "file" else []) + ([weights] if weights else []):
            if os.path.isfile(path):
                found.setdefault(path, False)
        if kind == "diffusers" and os.path.isdir(diffusers_folder(reference)):
            found.setdefault(diffusers_folder(reference), True)
    for path in getattr(spec, "inputs", ()):
        if os.path.isfile(path):
            found.setdefault(path, False)
    dataset = getattr(spec, "dataset", None) or ""
    for path in dataset_folders(dataset):
        if os.path.isdir(path):
            found.setdefault(path, True)
    root = getattr(spec, "data_root", None)
    if root and dataset in ROOTED and os.path.isdir(root):
        found.setdefault(root, True)
    return list(found.items())


def diffusers_folder(reference: str) -> str:
    """The folder of a ``diffusers:DIR`` reference."""
    return reference[len(usermodels.DIFFUSERS):]


def dataset_folders(dataset: str) -> list[str]:
    """The folders a ``folder:PATH`` or ``folder:train=A,test=B`` dataset names (none for other datasets)."""
    if not dataset.startswith(FOLDER_PREFIX):
        return []
    text = dataset[len(FOLDER_PREFIX):]
    if text.startswith(("train=", "test=")):
        return [part.partition("=")[2] for part in text.split(",") if part.partition("=")[2]]
    return [text] if text else []


def upload(spec, settings, say=None):
    """``spec`` with ``uploads`` naming the store's copy of each of its local files and folders (S3 stores only;
    the spec as it is for a local store). ``say(line)`` hears one line per path: uploaded, or already there."""
    store = artifacts.store_for(settings)
    if not isinstance(store, artifacts.S3Store) or not hasattr(spec, "uploads"):
        return spec
    found, paths = {}, local_paths(spec)
    if paths:
        store.check()  # a bucket that is not there or not ours: one line, before anything is read or sent
    for path, folder in paths:
        found[path] = _put_folder(store, path, say) if folder else _put_file(store, spec, path, say)
    return dataclasses.replace(spec, uploads=found) if found else spec


def _put_file(store, spec, path: str, say) -> dict:
    sha256 = artifacts.file_sha256(path)
    pinned = {p: s for options in getattr(spec, "models", {}).values() for p, s in options.get("files", {}).items()}
    if pinned.get(path, sha256) != sha256:
        raise CheckpointError(f"{path} changed while the job was being submitted: submit it again")
    return _put(store, path, sha256, f"{path}: {_size(os.path.getsize(path))}", say)


def _put_folder(store, folder: str, say) -> dict:
    with tempfile.TemporaryDirectory(prefix="dsq-bundle-") as scratch:
        tar = Path(scratch) / "bundle.tar"
        files, size = bundle(folder, tar)
        sha256 = artifacts.file_sha256(tar)
        return _put(store, tar, sha256, f"folder {folder}: {files:,} files, {_size(size)}", say)


def _put(store, path, sha256: str, what: str, say) -> dict:
    location = store.holds(sha256)
    if location is None:
        if say:
            say(f"uploading {what}")
        location, stored = store.put(path)
        if stored != sha256:
            raise CheckpointError(f"{what.partition(':')[0]} changed while it was uploaded: submit it again")
    elif say:
        say(f"{what}: already in the artifact store, nothing to upload")
    return {"location": location, "sha256": sha256}


def _size(count: int) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:,} {unit}" if unit == "bytes" else f"{count:,.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def bundle(folder: str | os.PathLike, target: str | os.PathLike) -> tuple[int, int]:
    """Write ``folder`` as a tar to ``target``: names in order, no times, owners or modes (the same folder gives the
    same bytes); symbolic links are followed. Returns (files, bytes of them)."""
    files = size = 0
    try:
        with tarfile.open(target, "w", format=tarfile.GNU_FORMAT) as tar:
            for here, folders, names in os.walk(folder, followlinks=True):
                folders.sort()
                relative = os.path.relpath(here, folder)
                for name in folders:
                    tar.addfile(_entry(os.path.normpath(os.path.join(relative, name)), tarfile.DIRTYPE, 0))
                for name in sorted(names):
                    path = os.path.join(here, name)
                    length = os.path.getsize(path)
                    with open(path, "rb") as handle:
                        tar.addfile(_entry(os.path.normpath(os.path.join(relative, name)), tarfile.REGTYPE, length),
                                    handle)
                    files, size = files + 1, size + length
    except OSError as error:
        raise InvalidArgument(f"cannot read {error.filename or folder}: {artifacts.os_reason(error)}") from None
    return files, size


def _entry(name: str, kind: bytes, size: int) -> tarfile.TarInfo:
    entry = tarfile.TarInfo(name)
    entry.type, entry.size, entry.mtime = kind, size, 0
    entry.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    return entry


# ---------------------------------------------------------------------------------------------- where jobs run


def local_copy(settings, entry: dict, folder: bool) -> str:
    """The local path of an upload: the fetched file, or the folder bundle unpacked (once) into the cache."""
    path = artifacts.fetch(settings, entry["location"], entry["sha256"])
    if not folder:
        return str(path)
    unpacked = Path(settings.home) / "cache" / "uploads" / entry["sha256"]
    if not unpacked.is_dir():
        unpacked.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(dir=unpacked.parent, prefix=".part-"))
        try:
            with tarfile.open(path) as tar:
                tar.extractall(scratch, filter="data")
            os.replace(scratch, unpacked)  # another process may have won the race: its copy is the same bytes
        except OSError as error:
            if not unpacked.is_dir():
                raise ArtifactStoreError(f"cannot unpack {entry['location']} into {unpacked.parent}: "
                                         f"{artifacts.os_reason(error)}") from None
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return str(unpacked)


def data_spec(settings, spec):
    """``spec`` with its dataset folders, data root and input files read from the store's copies (for reading the
    data only: the job's stored spec keeps the paths as given)."""
    uploads = getattr(spec, "uploads", None)
    if not uploads:
        return spec
    local = {path: local_copy(settings, entry, os.fspath(path) not in getattr(spec, "inputs", ()))
             for path, entry in uploads.items() if _is_data(spec, path)}
    changes = {}
    if spec.dataset and dataset_folders(spec.dataset):
        text = spec.dataset[len(FOLDER_PREFIX):]
        if text.startswith(("train=", "test=")):
            parts = [f"{split}={local.get(folder, folder)}" for split, _, folder in
                     (part.partition("=") for part in text.split(","))]
            changes["dataset"] = FOLDER_PREFIX + ",".join(parts)
        else:
            changes["dataset"] = FOLDER_PREFIX + local.get(text, text)
    if spec.data_root in local:
        changes["data_root"] = local[spec.data_root]
    if getattr(spec, "inputs", ()):
        changes["inputs"] = tuple(local.get(path, path) for path in spec.inputs)
    return dataclasses.replace(spec, **changes)


def _is_data(spec, path: str) -> bool:
    return path == spec.data_root or path in getattr(spec, "inputs", ()) or path in dataset_folders(spec.dataset or "")


def model_uploads(uploads: dict | None, reference: str, options: dict | None) -> dict:
    """The uploads of one model: its file, its weights or its diffusers folder (what travels with its source)."""
    paths = (reference, (options or {}).get("weights"), diffusers_folder(reference))
    return {path: entry for path, entry in (uploads or {}).items() if path in paths}


def local_source(settings, source: dict) -> dict:
    """A model's source (``references.source``) with its uploaded file and weights replaced by their local copies."""
    uploads = source.get("uploads")
    if not uploads:
        return source
    diffusers = usermodels.form(source["reference"]) == "diffusers"
    folder = diffusers_folder(source["reference"]) if diffusers else None
    local = {path: local_copy(settings, entry, path == folder) for path, entry in uploads.items()}
    options = dict(source["options"])
    if options.get("weights") in local:
        options["weights"] = local[options["weights"]]
    if options.get("files"):
        options["files"] = {_moved(path, local, folder): sha256 for path, sha256 in options["files"].items()}
    reference = local.get(source["reference"], source["reference"])
    if folder in local:
        reference = usermodels.DIFFUSERS + local[folder]
    location = local.get(source["location"], source["location"])
    return {**source, "reference": reference, "location": location, "options": options, "uploads": {}}


def _moved(path: str, local: dict, folder: str | None) -> str:
    """Where a pinned file is read from: its fetched copy, or its place in the unpacked copy of its model folder."""
    if folder in local and path.startswith(folder.rstrip(os.sep) + os.sep):
        return os.path.join(local[folder], os.path.relpath(path, folder))
    return local.get(path, path)


def check(uploads) -> dict:
    """A spec's ``uploads``: paths to their store ``location`` and ``sha256``."""
    if not isinstance(uploads, dict) or not all(
            isinstance(path, str) and isinstance(entry, dict) and set(entry) == {"location", "sha256"}
            and isinstance(entry["location"], str) and artifacts.is_sha256(entry["sha256"])
            for path, entry in uploads.items()):
        raise InvalidArgument(f"uploads must map paths to their store location and sha256, got {uploads!r}")
    return uploads
