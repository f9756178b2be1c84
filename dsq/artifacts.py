"""The artifact store: checkpoints every node can reach, addressed by their sha256.

Two backends behind one interface:

- ``LocalStore`` (the embedded default, ``$DSQ_HOME/artifacts``): a directory,
  shared between nodes only if it is on a shared file system.
- ``S3Store`` (``s3://bucket/prefix``, boto3, credentials from boto3's usual chain,
  ``DSQ_S3_ENDPOINT_URL`` for an S3-compatible server).

``put(path)`` copies a file in under ``sha256/<hex>.pt`` and returns ``(location, sha256)``;
``fetch(location, sha256)`` returns a local path and verifies the bytes against
``sha256`` on every call (S3 objects are cached under ``$DSQ_HOME/cache/artifacts``),
so a worker never loads a checkpoint other than the one that was recorded.

Locations: ``s3://bucket/prefix/sha256/<hex>.pt`` for S3; for a local store the path
*relative to the store* (``sha256/<hex>.pt``), resolved against the store's root when
fetched, so a home (or store folder) can be moved, copied or restored from a backup as
a whole. Absolute locations recorded by older versions still load: the file itself
when it is there, else the same content address under the current root.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Protocol

from dsq import checks
from dsq.errors import ArtifactStoreError, CheckpointError, DsqError

CHUNK = 1 << 20  # bytes read at a time when hashing a file: 1 MiB streams a GB checkpoint in constant memory


class Store(Protocol):
    def check(self) -> None: ...

    def put(self, path: str | os.PathLike) -> tuple[str, str]: ...

    def fetch(self, location: str, sha256: str) -> Path: ...

    def put_at(self, path: str | os.PathLike, key: str) -> None: ...

    def get_at(self, key: str) -> Path | None: ...

    def remove_under(self, prefix: str) -> None: ...


def os_reason(error: OSError) -> str:
    """An OSError in a few words: ``permission denied``, ``no such file or directory``..."""
    return (error.strerror or type(error).__name__).lower()


def _sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a checkpoint file; one that cannot be read is a one-line ``CheckpointError``."""
    try:
        return _sha256_of(path)
    except OSError as error:
        raise CheckpointError(f"checkpoint {path} cannot be read: {os_reason(error)}") from None


def verify(path: Path, sha256: str, location: str) -> Path:
    """``path`` if its bytes hash to ``sha256``; raises ``CheckpointError`` otherwise."""
    if not path.is_file():
        raise CheckpointError(f"artifact {location} not found")
    try:
        found = _sha256_of(path)
    except OSError as error:
        raise ArtifactStoreError(f"artifact {location} cannot be read ({path}): {os_reason(error)}") from None
    if found != sha256:
        raise CheckpointError(f"artifact {location} sha256 mismatch: expected {sha256[:12]}, found {found[:12]}")
    return path


def _copy_atomically(source: str | os.PathLike, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, scratch = tempfile.mkstemp(dir=target.parent, prefix=".part-")
    os.close(fd)
    try:
        shutil.copyfile(source, scratch)
        os.replace(scratch, target)
    finally:
        if os.path.exists(scratch):
            os.unlink(scratch)


class LocalStore:
    """A directory; the location of an artifact is its path relative to the directory."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().absolute()

    def check(self) -> None:
        """Raise ``ArtifactStoreError`` unless artifacts can be written here."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ArtifactStoreError(f"cannot write artifacts to {self.root}: {error.strerror or error}") from None
        if not os.access(self.root, os.W_OK):
            raise ArtifactStoreError(f"cannot write artifacts to {self.root}: permission denied")

    def put(self, path: str | os.PathLike) -> tuple[str, str]:
        sha256 = file_sha256(path)
        location = content_address(sha256)
        target = self.root / location
        if not (target.is_file() and self._holds(target, sha256)):
            try:
                _copy_atomically(path, target)
            except OSError as error:
                raise ArtifactStoreError(f"cannot write artifact to {self.root}: {error.strerror or error}") from None
        return location, sha256

    def fetch(self, location: str, sha256: str) -> Path:
        path = self.path_of(location, sha256)
        if not path.is_file():
            raise CheckpointError(f"artifact {location} not found in the artifact store ({self.root})")
        return verify(path, sha256, location)

    def path_of(self, location: str, sha256: str) -> Path:
        """Where ``location`` is now: relative ones under this root; an absolute one (older dsq) as it is,
        or, once its folder was moved away, the same content address under this root."""
        path = Path(location.removeprefix("file://"))
        if ".." in path.parts:
            raise ArtifactStoreError(f"artifact location {location} leaves the store: '..' is not allowed")
        if not path.is_absolute():
            return self.root / path
        if path.is_file() or not _SHA256.fullmatch(sha256 or ""):
            return path
        return self.root / content_address(sha256)

    def put_at(self, path: str | os.PathLike, key: str) -> None:
        """Copy a file in under ``key`` (replacing what was there), atomically."""
        try:
            _copy_atomically(path, self.root / checked_key(key))
        except OSError as error:
            raise ArtifactStoreError(f"cannot write {key} to {self.root}: {os_reason(error)}") from None

    def get_at(self, key: str) -> Path | None:
        """The file kept under ``key``, or None."""
        path = self.root / checked_key(key)
        return path if path.is_file() else None

    def remove_under(self, prefix: str) -> None:
        """Remove every file kept under the key prefix ``prefix`` (a folder); none there is fine."""
        try:
            shutil.rmtree(self.root / checked_key(prefix))
        except FileNotFoundError:
            pass
        except OSError as error:
            raise ArtifactStoreError(f"cannot remove {prefix} from {self.root}: {os_reason(error)}") from None

    def _holds(self, target: Path, sha256: str) -> bool:
        try:
            return _sha256_of(target) == sha256
        except OSError as error:
            raise ArtifactStoreError(f"artifact {target} cannot be read: {os_reason(error)}") from None


_SHA256 = re.compile(r"[0-9a-f]{64}")


def is_sha256(text) -> bool:
    """Whether ``text`` is a sha256 in hex (64 lowercase hex digits)."""
    return isinstance(text, str) and bool(_SHA256.fullmatch(text))


def checked_key(key: str) -> str:
    """A key of ``put_at`` and friends: a relative path inside the store, without '..'."""
    if not key or key.startswith("/") or ".." in key.split("/"):
        raise ArtifactStoreError(f"store key {key!r} leaves the store")
    return key


def content_address(sha256: str) -> str:
    """Where a store keeps the bytes with this sha256, relative to its root (its layout)."""
    return f"sha256/{sha256}.pt"


def split_s3(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> (``bucket``, ``some/prefix``)."""
    rest = url.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    if not url.startswith("s3://") or not bucket:
        raise ArtifactStoreError(f"malformed S3 location {url}: use s3://bucket/prefix")
    return bucket, prefix.strip("/")


class S3Store:
    """A bucket (and key prefix) on S3 or an S3-compatible server."""

    def __init__(self, url: str, *, cache: str | os.PathLike, endpoint_url: str | None = None):
        self.url = url.rstrip("/")
        self.bucket, self.prefix = split_s3(self.url)
        self.cache = Path(cache)
        self.endpoint_url = endpoint_url
        self._client = None

    @property
    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            config = Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 3})
            self._client = boto3.client("s3", endpoint_url=self.endpoint_url, config=config)
        return self._client

    def check(self) -> None:
        """Raise ``ArtifactStoreError`` unless the bucket exists and these credentials reach it."""
        with _s3_errors(self.url):
            self.client.head_bucket(Bucket=self.bucket)

    def put(self, path: str | os.PathLike) -> tuple[str, str]:
        sha256 = file_sha256(path)
        key = self._key(content_address(sha256))
        with _s3_errors(f"s3://{self.bucket}/{key}"):
            self.client.upload_file(os.fspath(path), self.bucket, key, ExtraArgs={"Metadata": {"sha256": sha256}})
        return f"s3://{self.bucket}/{key}", sha256

    def holds(self, sha256: str) -> str | None:
        """The location of the object with this sha256 when the bucket has it already (put with its hash), else None."""
        from botocore.exceptions import ClientError

        key = self._key(content_address(sha256))
        with _s3_errors(f"s3://{self.bucket}/{key}"):
            try:
                found = self.client.head_object(Bucket=self.bucket, Key=key)
            except ClientError as error:
                if _missing(error):
                    return None
                raise
        return f"s3://{self.bucket}/{key}" if found.get("Metadata", {}).get("sha256") == sha256 else None

    def _key(self, key: str) -> str:
        return "/".join(filter(None, [self.prefix, checked_key(key)]))

    def put_at(self, path: str | os.PathLike, key: str) -> None:
        """Upload a file under ``key`` (an S3 upload replaces the object whole or not at all)."""
        with _s3_errors(f"{self.url}/{key}"):
            self.client.upload_file(os.fspath(path), self.bucket, self._key(key))

    def get_at(self, key: str) -> Path | None:
        """A local copy of the object under ``key`` (in the cache folder), or None when there is none."""
        from botocore.exceptions import ClientError

        local = self.cache / "keyed" / checked_key(key)
        local.parent.mkdir(parents=True, exist_ok=True)
        with _s3_errors(f"{self.url}/{key}"):
            try:
                self.client.download_file(self.bucket, self._key(key), os.fspath(local))
            except ClientError as error:
                if _missing(error):
                    return None
                raise
        return local

    def remove_under(self, prefix: str) -> None:
        """Delete every object under the key prefix ``prefix`` (a folder)."""
        folder = self._key(prefix).rstrip("/") + "/"
        with _s3_errors(f"{self.url}/{prefix}"):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=folder)
            for page in pages:
                for item in page.get("Contents", []):
                    self.client.delete_object(Bucket=self.bucket, Key=item["Key"])
        shutil.rmtree(self.cache / "keyed" / checked_key(prefix), ignore_errors=True)

    def fetch(self, location: str, sha256: str) -> Path:
        local = self.cache / f"{sha256}.pt"
        if local.is_file():
            try:
                return verify(local, sha256, location)
            except CheckpointError:
                local.unlink(missing_ok=True)  # a corrupt cache entry: fetch it again
        bucket, key = split_s3(location)
        local.parent.mkdir(parents=True, exist_ok=True)
        fd, scratch = tempfile.mkstemp(dir=local.parent, prefix=".part-")
        os.close(fd)
        try:
            with _s3_errors(location):
                self.client.download_file(bucket, key, scratch)
            verify(Path(scratch), sha256, location)
            os.replace(scratch, local)
        finally:
            if os.path.exists(scratch):
                os.unlink(scratch)
        return local


def _missing(error) -> bool:
    """Whether a botocore ClientError says the object is not there."""
    return str(error.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey", "NotFound")


class _s3_errors:
    """Turn boto's exceptions into one ``ArtifactStoreError`` line."""

    def __init__(self, location: str):
        self.location = location

    def __enter__(self):
        return self

    def __exit__(self, kind, error, trace):
        if error is None or isinstance(error, DsqError):
            return False
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        if isinstance(error, ClientError):
            info = error.response.get("Error", {})
            reason = f"{info.get('Code', '?')}: {info.get('Message') or 'access denied or not found'}"
        elif isinstance(error, (BotoCoreError, S3UploadFailedError)):
            reason = checks.first_line(error)
        else:
            return False
        raise ArtifactStoreError(f"cannot use artifact {self.location}: {reason}") from None


def open_store(url: str | None, *, home: str | os.PathLike, endpoint_url: str | None = None) -> Store:
    """The store ``url`` names: ``s3://bucket/prefix``, a directory, or None for ``home/artifacts``."""
    if url and url.startswith("s3://"):
        return S3Store(url, cache=Path(home) / "cache" / "artifacts", endpoint_url=endpoint_url)
    if url and "://" in url and not url.startswith("file://"):
        raise ArtifactStoreError(f"unsupported artifact store {url}: use a directory or s3://bucket/prefix")
    return LocalStore(url.removeprefix("file://") if url else Path(home) / "artifacts")


def store_for(settings) -> Store:
    """The store the settings configure (``DSQ_ARTIFACTS``)."""
    return open_store(settings.artifacts_url, home=settings.home, endpoint_url=settings.s3_endpoint_url)


def fetch(settings, location: str, sha256: str) -> Path:
    """A verified local copy of the artifact at ``location``, whichever backend it lives in.

    A local location is looked up in the configured local store, then in ``$DSQ_HOME/artifacts``
    (where it was put if the store has since been switched to S3 or another folder).
    """
    if location.startswith("s3://"):
        return open_store(location, home=settings.home, endpoint_url=settings.s3_endpoint_url).fetch(location, sha256)
    stores = [store for store in (store_for(settings), LocalStore(Path(settings.home) / "artifacts"))
              if isinstance(store, LocalStore)]
    paths = [store.path_of(location, sha256) for store in stores]
    found = next((path for path in paths if path.is_file()), paths[0])
    if not found.is_file():
        roots = " or ".join(dict.fromkeys(str(store.root) for store in stores))
        raise CheckpointError(f"artifact {location} not found in the artifact store ({roots})")
    return verify(found, sha256, location)


def remove(settings, location: str, sha256: str) -> None:
    """Delete an artifact's file from its store (``dsq delete --artifacts``); one that is gone already is fine."""
    if location.startswith("s3://"):
        store = open_store(location, home=settings.home, endpoint_url=settings.s3_endpoint_url)
        bucket, key = split_s3(location)
        with _s3_errors(location):
            store.client.delete_object(Bucket=bucket, Key=key)
        (store.cache / f"{sha256}.pt").unlink(missing_ok=True)
        return
    for store in (store_for(settings), LocalStore(Path(settings.home) / "artifacts")):
        if isinstance(store, LocalStore):
            try:
                store.path_of(location, sha256).unlink(missing_ok=True)
            except OSError as error:
                raise ArtifactStoreError(f"cannot remove artifact {location}: {os_reason(error)}") from None
