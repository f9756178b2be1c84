"""The pid file of a background worker (``$DSQ_HOME/workers/<database digest>.pid``): one per database.

``dsq submit`` reads it (``workers.background``) to tell whether a worker was started moments ago; the worker
(``workers.worker``) removes it when it retires and writes it again when it serves on.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from dsq.settings import Settings


def path(settings: Settings) -> Path:
    digest = hashlib.sha256(settings.database_url.encode()).hexdigest()[:12]
    return settings.home / "workers" / f"{digest}.pid"


def forget(settings: Settings) -> bool:
    """Remove this process's pid file (a background worker about to stop); whether it was this process's."""
    pid_file = path(settings)
    try:
        if pid_file.read_text().split()[0] != str(os.getpid()):
            return False
        pid_file.unlink()
    except (OSError, IndexError):
        return False
    return True


def remember(settings: Settings) -> None:
    """Write this process's pid file again (a background worker that serves on), unless a new worker wrote one."""
    try:
        with open(path(settings), "x") as pid_file:
            pid_file.write(f"{os.getpid()}\n")
    except OSError:
        pass


def alive(pid_file: Path) -> bool:
    try:
        pid = int(pid_file.read_text().split()[0])
        os.kill(pid, 0)
    except (OSError, ValueError, IndexError):
        return False
    try:  # a zombie (our own exited child) is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0] != "Z"
    except OSError:
        return True
