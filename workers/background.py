"""Make sure a worker serves the queue: on one machine a background process, on a cluster a detached actor.

``dsq submit`` calls ``ensure_worker`` after queueing a job, so a job always leads to a run without a
terminal left open. The background process (``dsq worker --idle-exit S``) stops by itself once nothing
has been left to run for S seconds (``DSQ_WORKER_IDLE_SECONDS``, default 180); its log is
``$DSQ_HOME/worker.log`` and its pid is in ``$DSQ_HOME/workers/*.pid`` (stop it with ``kill PID``:
it hands its jobs back to the queue).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from dsq import jobqueue
from dsq.db.session import session_scope
from dsq.settings import Settings
from workers import pidfile


def ensure_worker(settings: Settings, engine) -> str | None:
    """Start a worker for this database and cluster unless one is alive; return what was started, as a line."""
    if not settings.autostart:
        return None
    with session_scope(engine) as session:
        if any(w.address == settings.ray_address and not _dead_here(w)
               for w in jobqueue.live_workers(session, settings.stale_after)):
            return None
    if settings.ray_address:
        from workers import resources, worker

        resources.connect(settings.ray_address)
        name = worker.start_detached(settings, idle_exit=settings.idle_seconds)
        return f"started worker {name} on the cluster (it stops after {settings.idle_seconds:.0f} s idle)"
    pid_file = pidfile.path(settings)
    if pidfile.alive(pid_file):  # started moments ago, not registered yet
        return None
    return _spawn(settings, pid_file)


def _dead_here(worker) -> bool:
    """A worker registered on this machine whose process is gone (killed): its fresh heartbeat is no reason to
    start none (the new worker takes its jobs over at once)."""
    return worker.host == socket.gethostname() and pidfile.gone(worker.pid, worker.started_at)


def _spawn(settings: Settings, pid_file: Path) -> str:
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    log_path = settings.home / "worker.log"
    command = [sys.executable, "-m", "cli", "--db", settings.database_url, "worker",
               "--idle-exit", f"{settings.idle_seconds:g}"]
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True, env=os.environ.copy())
    pid_file.write_text(f"{process.pid}\n")
    return (f"started a background worker (pid {process.pid}, log {log_path}); it stops after "
            f"{settings.idle_seconds:.0f} s with nothing to run, or with `kill {process.pid}`")
