"""The pid file of a background worker (``$DSQ_HOME/workers/<database digest>.pid``): one per database.

``dsq submit`` reads it (``workers.background``) to tell whether a worker was started moments ago; the worker
(``workers.worker``) removes it when it retires and writes it again when it serves on. ``gone`` tells whether the
process of a worker registered on this machine is dead (its jobs go back to the queue at once).
"""

from __future__ import annotations

import hashlib
import os
from datetime import datetime, timezone
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


START_SLACK_SECONDS = 30.0  # a worker registers seconds after its process starts; a clock step may add a few


def gone(pid: int, registered_at: datetime | None = None) -> bool:
    """Whether the process of a worker registered on this machine (with this pid, at ``registered_at``) is dead.

    Dead: no process has the pid, or it is a zombie, or the process now holding the pid started after the worker
    registered (the pid was reused). Anything unsure counts as alive: the stale heartbeat limit decides then.
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: a process of another user holds the pid
        pass
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    except (OSError, IndexError):
        return False  # no /proc (or it ended meanwhile: the next look sees it gone)
    if fields[0] in ("Z", "X"):
        return True
    started = _start_time(fields)
    if started is None or registered_at is None:
        return False
    if registered_at.tzinfo is None:
        registered_at = registered_at.replace(tzinfo=timezone.utc)
    return started > registered_at.timestamp() + START_SLACK_SECONDS


def _start_time(fields: list[str]) -> float | None:
    """When a process started (seconds since the epoch), from its /proc/PID/stat fields after the name."""
    try:
        ticks = int(fields[19])  # field 22, starttime: clock ticks after boot
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None
