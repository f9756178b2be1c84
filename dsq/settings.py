"""Where dsq keeps things: database URL, Ray address, home folder for artifacts.

Built from an explicit mapping (normally ``os.environ``, passed in by the CLI),
never read at import time.

- ``DSQ_HOME``          default ``~/.dsq``; holds ``dsq.db`` and ``artifacts/``
- ``DSQ_DATABASE_URL``  default ``sqlite:///$DSQ_HOME/dsq.db``
- ``RAY_ADDRESS``       default: none, a local Ray started in-process
- ``DSQ_DATA``          default root for dataset folders (cifar10, imagenet)
- ``DSQ_ARTIFACTS``     artifact store: a directory or ``s3://bucket/prefix``; default ``$DSQ_HOME/artifacts``
- ``DSQ_S3_ENDPOINT_URL`` an S3-compatible server instead of AWS (MinIO, moto...)
"""

from __future__ import annotations

from dataclasses import dataclass
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
        )

    @property
    def artifacts(self) -> Path:
        return self.home / "artifacts"

