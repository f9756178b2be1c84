"""``dsq worker``: drain the queue on a local Ray or a cluster."""

from __future__ import annotations

import signal
import time
from typing import Optional

import typer

from cli import common


def register(app: typer.Typer) -> None:
    app.command()(worker)


def worker(ctx: typer.Context,
           drain: bool = typer.Option(False, help="Exit once nothing is left to run (scripts, tests)."),
           max_jobs: Optional[int] = typer.Option(None, help="Run at most K jobs at once (default: as the "
                                                  "cluster's CPUs/GPUs allow)."),
           idle_exit: Optional[float] = typer.Option(None, help="Exit after this many seconds with nothing to run."),
           detach: bool = typer.Option(False, help="Start the worker as a detached actor on the cluster "
                                       "(--address) and return."),
           max_request: Optional[str] = typer.Option(None, help="Autoscaling: ask Ray's autoscaler for what queued "
                                                     "jobs need, up to this total, e.g. GPU=8,CPU=64.")):
    """Run queued jobs whose dependencies have succeeded, highest priority first, several at once when they fit.

    SIGINT or SIGTERM: stop claiming, hand running jobs back to the queue (stored results are kept), exit
    128 + the signal's number (130, 143).
    """
    from dsq import checks
    from dsq.errors import InvalidArgument

    config = common.settings(ctx)
    runner, waiting = None, False
    asked: list[str] = []  # a stop signal that came while it waited for the database

    def stop(name: str) -> None:
        if runner is not None:
            runner.stop(name)
        elif waiting:  # the wait looks between two tries (raised inside the database driver, it could be lost)
            asked.append(name)
        else:  # before it serves, a signal ends the command where it is
            raise common.Stopped(signal.Signals[name])

    try:
        with common.StopSignals(stop) as signals:
            with common.boundary():
                if max_jobs is not None:
                    checks.positive_int("--max-jobs", max_jobs)
                if idle_exit is not None and not idle_exit > 0:
                    raise InvalidArgument(f"--idle-exit must be a number of seconds > 0, got {idle_exit}")
                if detach and not config.ray_address:
                    raise InvalidArgument("--detach needs a cluster: pass --address or set RAY_ADDRESS")
                cap = parse_resources(max_request) if max_request is not None else None
                waiting = True
                wait_for_database(config, asked)  # a bad URL is one line here, before Ray starts
                waiting = False
                from workers import resources, worker as queue_worker

                resources.connect(config.ray_address)
                signals.install()  # again: Ray's start put its own SIGTERM handler in place
                if detach:
                    name = queue_worker.start_detached(config, max_jobs=max_jobs, idle_exit=idle_exit,
                                                       max_request=cap)
                    common.console.print(f"worker {name} started on the cluster")
                    return
                runner = queue_worker.QueueWorker(config, max_jobs=max_jobs, drain=drain, idle_exit=idle_exit,
                                                  log=lambda line: common.say(f"{now()} worker: {line}"),
                                                  max_request=cap)
            common.say(f"{now()} worker {runner.name}: serving {config.database_url.split('@')[-1]}")
            summary = runner.run()
    except common.Stopped as stopped:
        common.say(f"{now()} worker stopped ({stopped}) before serving", err=True)
        raise common.signal_exit(stopped.number) from None
    back = f"; handed back to the queue: jobs {', '.join(map(str, summary.handed_back))}" if summary.handed_back else ""
    common.say(f"{now()} worker {runner.name} stopped ({summary.reason}); ran {len(summary.ran)} job(s){back}",
               err=summary.database_lost)
    if signals.number is not None:
        raise common.signal_exit(signals.number)
    if summary.database_lost:
        raise typer.Exit(common.EXIT_FAILED)


def wait_for_database(config, asked: list[str]) -> None:
    """Open the database, waiting up to the grace period (DSQ_DB_GRACE_SECONDS) for a PostgreSQL server that does not
    answer yet: a worker started with its cluster may come up before the server. A URL that is wrong, a login or a
    database the server refuses, is one line at once. A stop signal the handler put in ``asked`` ends the wait."""
    from dsq.db.session import RETRY_PAUSE_S
    from dsq.errors import DatabaseUnreachable

    deadline, said = time.monotonic() + config.db_grace_seconds, False
    while True:
        if asked:
            raise common.Stopped(signal.Signals[asked[0]])
        try:
            common.database(config).dispose()
            return
        except DatabaseUnreachable as error:
            if not error.transient or time.monotonic() >= deadline:
                raise
            if not said:
                common.say(f"{now()} worker: {error}; asking again for up to {config.db_grace_seconds:.0f} s",
                           err=True)
                said = True
        for _ in range(10):  # a stop signal is seen within a tenth of a second
            if asked:
                break
            time.sleep(RETRY_PAUSE_S / 10)


def now() -> str:
    """The local time with its offset from UTC, to the second: ``2026-11-29T16:58:14+01:00``."""
    from datetime import datetime

    return datetime.now().astimezone().isoformat(timespec="seconds")


def parse_resources(text: str) -> dict[str, float]:
    """``GPU=8,CPU=64`` as {"GPU": 8.0, "CPU": 64.0}; one clear line for anything else."""
    from dsq.errors import InvalidArgument

    cap = {}
    for part in text.split(","):
        name, _, amount = part.strip().partition("=")
        try:
            value = float(amount)
        except ValueError:
            value = -1.0
        if not name or not value > 0 or value == float("inf"):
            raise InvalidArgument(f"--max-request must look like GPU=8,CPU=64 (positive amounts), got {text!r}")
        cap[name] = value
    return cap
