"""Where dsq keeps things: database URL, Ray address, home folder for artifacts.

Built from an explicit mapping (normally ``os.environ``, passed in by the CLI),
never read at import time.

- ``DSQ_HOME``          default ``~/.dsq``; holds ``dsq.db`` and ``artifacts/``
- ``DSQ_DATABASE_URL``  default ``sqlite:///$DSQ_HOME/dsq.db``
- ``RAY_ADDRESS``       default: none, a local Ray started in-process (or, with ``DSQ_LOCAL_RAY_ADDRESS``,
  a Ray already running on this machine, joined instead)
- ``DSQ_DATA``          default root for dataset folders (cifar10, imagenet)
- ``DSQ_ARTIFACTS``     artifact store: a directory or ``s3://bucket/prefix``; default ``$DSQ_HOME/artifacts``
- ``DSQ_S3_ENDPOINT_URL`` an S3-compatible server instead of AWS (MinIO, moto...)
- ``DSQ_STALE_SECONDS`` a running job whose heartbeat is older is taken over by another worker (default 60)
- ``DSQ_WORKER_IDLE_SECONDS`` a background worker started by ``dsq submit`` exits after this long
  with nothing to run (default 180)
- ``DSQ_DB_GRACE_SECONDS`` how long workers and jobs wait for a PostgreSQL server that went away (default 60)
- ``DSQ_TRAIN_CHECKPOINT_SECONDS`` a training also stores its resumable checkpoint this often within
  an epoch (default 300; it always does at an epoch's end)
- ``DSQ_WORKER_AUTOSTART``  ``0``: ``dsq submit`` never starts a background worker (you run your own)
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Mapping

from dsq.db.session import default_database_url


@dataclass(frozen=True)
class Settings:
    database_url: str
    home: Path
    ray_address: str | None = None
    data_root: str | None = None
    artifacts_url: str | None = None
    s3_endpoint_url: str | None = None
    # Runners heartbeat every few seconds (workers.worker.HEARTBEAT_SECONDS); a minute of silence is a dead worker.
    stale_seconds: float = 60.0
    # A background worker lives a few minutes past its last job, so a plan submitted step by step reuses it.
    idle_seconds: float = 180.0
    autostart: bool = True
    # A database restart or a failover takes seconds to a minute: wait that long before giving a job up.
    db_grace_seconds: float = 60.0
    # A training stores a resumable checkpoint at each epoch's end; an epoch that runs longer (ImageNet: an hour)
    # stores one every 5 minutes too, so a preempted node loses at most that much, while writing one (model and
    # optimizer, tens of MB to S3 in seconds) costs a few percent of the time at most.
    train_checkpoint_seconds: float = 300.0

    def data_root_of(self, spec) -> str | None:
        """Where a job's datasets are: its own ``data_root``, else this machine's (``DSQ_DATA``)."""
        return spec.data_root or self.data_root

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, db: str | None = None, address: str | None = None) -> "Settings":
        home = Path(env.get("DSQ_HOME") or Path.home() / ".dsq").expanduser()
        return cls(
            database_url=db or env.get("DSQ_DATABASE_URL") or default_database_url(home, env={}),
            home=home,
            ray_address=address or env.get("RAY_ADDRESS") or None,
            data_root=env.get("DSQ_DATA") or None,
            artifacts_url=env.get("DSQ_ARTIFACTS") or None,
            s3_endpoint_url=env.get("DSQ_S3_ENDPOINT_URL") or None,
            stale_seconds=_seconds(env, "DSQ_STALE_SECONDS", 60.0),
            idle_seconds=_seconds(env, "DSQ_WORKER_IDLE_SECONDS", 180.0),
            autostart=env.get("DSQ_WORKER_AUTOSTART", "1") != "0",
            db_grace_seconds=_seconds(env, "DSQ_DB_GRACE_SECONDS", 60.0),
            train_checkpoint_seconds=_seconds(env, "DSQ_TRAIN_CHECKPOINT_SECONDS", 300.0),
        )

    @property
    def stale_after(self) -> timedelta:
        return timedelta(seconds=self.stale_seconds)

    @property
    def artifacts(self) -> Path:
        return self.home / "artifacts"



def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    from dsq.errors import InvalidArgument

    text = env.get(name)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise InvalidArgument(f"{name} must be a number of seconds > 0, got {text!r}")
    return value
