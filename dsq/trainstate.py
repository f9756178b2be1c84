"""A train job's resumable checkpoints: where they live in the artifact store, and how they are read back.

One file per job and spec, ``resume/job-<N>/<hash>.pt`` under the store's root (local folder or S3),
overwritten at every checkpoint (``dsq.training.fit`` makes the state). The hash covers the job's spec
and the sources of the models it loads (their sha256 pins), so a changed spec or another model never
resumes a stale state. No database row names these files: ``job:N``, ``dsq show`` and the artifact
rows know only the model a finished job stored. The job removes its folder when it succeeds, and
``dsq delete`` removes it with the job.

Read back with ``torch.load(weights_only=True)`` (``checkpoints.read``): tensors and plain data only.
This module imports no torch until a state is written or read.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

from dsq import artifacts
from dsq.errors import CheckpointError


def folder(job_id: int) -> str:
    """The store key prefix of a job's resumable checkpoints."""
    return f"resume/job-{int(job_id)}"


def key(job_id: int, spec: dict, sources: dict) -> str:
    """The store key of the resumable checkpoint of this job with this spec and these model sources."""
    text = json.dumps({"spec": spec, "sources": sources}, sort_keys=True, default=str)
    return f"{folder(job_id)}/{hashlib.sha256(text.encode()).hexdigest()[:16]}.pt"


def save(store: artifacts.Store, at: str, state: dict) -> None:
    """Write ``state`` (tensors and plain data) to the store under the key ``at``."""
    import torch

    fd, scratch = tempfile.mkstemp(prefix="dsq-resume-", suffix=".pt")
    os.close(fd)
    try:
        torch.save(state, scratch)
        store.put_at(scratch, at)
    finally:
        os.unlink(scratch)


def load(store: artifacts.Store, at: str) -> tuple[object, str | None]:
    """(the state stored under ``at``, None), (None, None) when there is none, or (None, why it is unreadable)."""
    from dsq import checkpoints

    path = store.get_at(at)
    if path is None:
        return None, None
    try:
        return checkpoints.read(os.fspath(path))[0], None
    except CheckpointError as error:
        return None, str(error)


def remove(settings, job_id: int) -> None:
    """Remove a job's resumable checkpoints from the configured store (none there is fine)."""
    artifacts.store_for(settings).remove_under(folder(job_id))
