"""``dsq jobs|status|logs|cancel|resume``: follow and steer jobs."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Optional

import typer
from rich.table import Table

from cli import common
from dsq import jobs as lifecycle
from dsq.db import repo
from dsq.db.session import session_scope


def register(app: typer.Typer) -> None:
    for command in (list_jobs, status, logs, cancel, resume):
        app.command(name=command.__name__.replace("list_", ""))(command)


def list_jobs(ctx: typer.Context, limit: int = typer.Option(50, help="Newest jobs shown.")):
    """List jobs, newest first."""
    with common.boundary():
        engine = common.database(common.settings(ctx))
        table = Table("id", "kind", "name", "status", "progress", "created")
        with session_scope(engine) as session:
            for job in repo.list_jobs(session, limit=limit):
                table.add_row(str(job.id), job.kind, job.name or "", job.status,
                              f"{job.progress_done}/{job.progress_total}", f"{job.created_at:%Y-%m-%d %H:%M:%S}")
        common.console.print(table)


def status(ctx: typer.Context, job: int = typer.Argument(..., help="Job id.")):
    """Show a job's state, progress, rate and ETA."""
    with common.boundary():
        engine = common.database(common.settings(ctx))
        with session_scope(engine) as session:
            for line in lifecycle.describe(repo.get_job(session, job), datetime.now(timezone.utc)):
                common.console.print(line, markup=False, highlight=False)


def logs(ctx: typer.Context, job: int = typer.Argument(..., help="Job id.")):
    """Print a job's log lines (and its traceback if it failed)."""
    with common.boundary():
        engine = common.database(common.settings(ctx))
        with session_scope(engine) as session:
            record = repo.get_job(session, job)
            for line in repo.logs_for_job(session, job):
                common.console.print(f"{line.created_at:%H:%M:%S} {line.level:5} {line.message}",
                                     markup=False, highlight=False)
            if record.traceback:
                common.console.print(record.traceback, markup=False, highlight=False)


def cancel(ctx: typer.Context, job: int = typer.Argument(..., help="Job id.")):
    """Stop a queued or running job; its runner stops within seconds."""
    with common.boundary():
        engine = common.database(common.settings(ctx))
        with session_scope(engine) as session:
            lifecycle.cancel(session, job)
        common.console.print(f"job {job}: cancel requested")


def resume(ctx: typer.Context, job: int = typer.Argument(..., help="Job id."),
           wait: bool = typer.Option(False, help="On a cluster: follow the job until it ends."),
           max_queries: Optional[int] = typer.Option(None, "--max-queries",
                                                     help="certify-api: raise the query budget first.")):
    """Continue a job whose runner died (or that failed or was cancelled), skipping stored results."""
    config = common.settings(ctx)
    with common.boundary():
        if config.ray_address:
            from workers import resources

            resources.connect(config.ray_address)
        engine = common.database(config)
        with session_scope(engine) as session:
            lifecycle.check_resumable(session, job)
            if max_queries is not None:
                from dsq.apis import jobs as api_jobs

                api_jobs.raise_budget(session, job, max_queries)
            lifecycle.reopen(session, job)
    if config.ray_address:
        common.start_on_cluster(config, job)
        if not wait:
            common.console.print(f"job {job} resumed")
            return
        final = common.follow(engine, job, f"job {job}")
    else:
        final = common.run_local(config, job, f"job {job}")
    common.finish(engine, job, final)
