"""What every command shares: settings, the error boundary, running a job with a progress bar."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Iterator

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from dsq import jobs
from dsq.db import repo
from dsq.db.session import open_database, session_scope
from dsq.errors import DsqError
from dsq.settings import Settings

# Piped or captured output is never cut to a terminal's 80 columns.
console = Console(width=None if sys.stdout.isatty() else 200)
errors = Console(stderr=True, width=None if sys.stderr.isatty() else 200)
EXIT_FAILED, EXIT_BAD_INPUT = 1, 2


def settings(ctx: typer.Context) -> Settings:
    return ctx.obj


@contextlib.contextmanager
def boundary() -> Iterator[None]:
    """Turn a dsq error into one line on stderr and exit code 2."""
    try:
        yield
    except DsqError as error:
        errors.print(f"error: {error}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None


def database(config: Settings):
    """The engine, with migrations applied (first use creates the schema)."""
    return open_database(config.database_url)


def progress_bar() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=errors, transient=False,
                    disable=not sys.stderr.isatty() and os.environ.get("DSQ_PROGRESS") != "1")


def run_local(config: Settings, job_id: int, label: str) -> str:
    """Run a job in this process on a local Ray, with a progress bar; return its status."""
    from workers import resources, runner  # Ray only where a job runs

    resources.connect(None)
    with progress_bar() as bar:
        task = bar.add_task(label, total=None)
        status = runner.run_job(config, job_id, on_progress=lambda done, total: bar.update(
            task, completed=done, total=total))
    return status


def start_on_cluster(config: Settings, job_id: int) -> None:
    from workers import runner

    runner.start_detached(config, job_id)


def follow(engine, job_id: int, label: str) -> str:
    """Poll a job that runs elsewhere until it ends, with a progress bar; return its status."""
    with progress_bar() as bar:
        task = bar.add_task(label, total=None)
        while True:
            with session_scope(engine) as session:
                job = repo.get_job(session, job_id)
                bar.update(task, completed=job.progress_done, total=job.progress_total or None)
                if job.status in jobs.FINISHED:
                    return job.status
            time.sleep(1.0)


def finish(engine, job_id: int, status: str) -> None:
    """Report a job's end; exit 1 if it failed."""
    with session_scope(engine) as session:
        job = repo.get_job(session, job_id)
        if status == "failed":
            errors.print(f"job {job_id} failed: {job.error}", markup=False)
            raise typer.Exit(EXIT_FAILED)
        console.print(f"job {job_id} {status}")
