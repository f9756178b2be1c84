"""``dsq jobs|status|logs|cancel|resume``: follow and steer jobs (no torch, no Ray)."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from cli import common
from dsq.db import repo
from dsq.db.models import utcnow
from dsq.db.session import session_scope


FOLLOW_SECONDS = 1.0  # how often --follow looks again: one small query


def register(app: typer.Typer) -> None:
    for command in (list_jobs, status, logs, show, cancel, resume, delete):
        app.command(name=command.__name__.replace("list_", ""))(command)


def list_jobs(ctx: typer.Context, limit: int = typer.Option(50, help="Newest jobs shown."),
              status: Optional[str] = typer.Option(None, "--status", help="Only jobs in this status."),
              kind: Optional[str] = typer.Option(None, "--kind", help="Only jobs of this kind."),
              experiment: Optional[str] = typer.Option(None, "--experiment", help="Only this experiment's jobs.")):
    """List jobs, newest first: state (queued at position P, waiting for job N, stale...), priority, progress."""
    from dsq import views

    config = common.settings(ctx)
    with common.boundary():
        engine = common.database(config, write=False)
        table = Table("id", "kind", "name", "state", "prio", "progress", "created")
        with session_scope(engine) as session:
            listed = repo.list_jobs(session, limit=limit, status=status, kind=kind, experiment=experiment)
            for row in views.job_rows(session, listed, utcnow(), config.stale_after):
                table.add_row(*row)
        common.console.print(table)


def status(ctx: typer.Context, job: int = typer.Argument(..., help="Job id."),
           follow: bool = typer.Option(False, "--follow", "-f", help="Print it again whenever it changes, "
                                       "until the job ends (Ctrl-C stops following).")):
    """Show a job's state (and why it is not running yet), progress, rate and ETA."""
    from dsq import views

    config = common.settings(ctx)
    with common.boundary():
        engine = common.database(config, write=False)
        shown = None
        with common.following(job) as signals:
            while True:
                with session_scope(engine) as session:
                    record = repo.get_job(session, job)
                    lines = views.describe(session, record, utcnow(), config.stale_after)
                if lines != shown:
                    for line in lines if shown is None else ["", *lines]:
                        common.say(line)
                    shown = lines
                if not follow or record.finished:
                    return
                signals.wait(FOLLOW_SECONDS)


def logs(ctx: typer.Context, job: int = typer.Argument(..., help="Job id."),
         follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines until the job ends.")):
    """Print a job's log lines, then each of its attempts with its worker and error (and its traceback if it failed)."""
    from dsq import views
    from dsq.text import escape_controls

    with common.boundary():
        engine = common.database(common.settings(ctx), write=False)
        last = 0
        with common.following(job) as signals:
            while True:
                with session_scope(engine) as session:
                    record = repo.get_job(session, job)
                    for line in repo.logs_for_job(session, job, after_id=last):
                        common.say(f"{line.created_at:%H:%M:%S} {line.level:5} {escape_controls(line.message)}")
                        last = line.id
                if not follow or record.finished:
                    runs = views.attempt_lines(session, record)
                    break
                signals.wait(FOLLOW_SECONDS)
        for line in runs:
            common.say(line)
        if record.traceback:
            common.say(record.traceback)


def show(ctx: typer.Context, job: int = typer.Argument(..., help="Job id.")):
    """Everything about a job: its whole spec, dependencies, the models it uses and their training metrics, artifacts."""
    from dsq import views

    config = common.settings(ctx)
    with common.boundary():
        engine = common.database(config, write=False)
        with session_scope(engine) as session:
            for line in views.show(session, repo.get_job(session, job), utcnow(), config.stale_after):
                common.say(line)


def cancel(ctx: typer.Context, job: int = typer.Argument(..., help="Job id.")):
    """Cancel a queued, waiting, running or stale job; jobs that wait for it fail."""
    from dsq import jobs as lifecycle

    config = common.settings(ctx)
    with common.boundary():
        engine = common.database(config)
        with session_scope(engine) as session:
            record = lifecycle.cancel(session, job, config.stale_after)
        said = "cancelled" if record.status == "cancelled" else "cancel requested (its runner stops within seconds)"
        common.console.print(f"job {job}: {said}")


def resume(ctx: typer.Context, job: int = typer.Argument(..., help="Job id."),
           wait: bool = typer.Option(False, help="Follow the job until it ends."),
           max_queries: Optional[int] = typer.Option(None, "--max-queries",
                                                     help="certify-api: raise the query budget first.")):
    """Queue a failed, cancelled or stale job again; it skips stored results. Jobs its failure failed are queued too."""
    from dsq import jobs as lifecycle
    from workers import background

    config = common.settings(ctx)
    with common.boundary():
        common.check_cluster(config)
        engine = common.database(config)
        with session_scope(engine) as session:
            if max_queries is not None:
                from dsq.kinds import certify_api

                certify_api.raise_budget(session, job, max_queries)
            requeued = lifecycle.resume(session, job, config.stale_after)
        common.console.print(f"job {job} queued" + (f"; queued again: jobs {requeued}" if requeued else ""))
        started = background.ensure_worker(config, engine)
    if started:
        common.say(started, err=True)
    if wait:
        common.finish(engine, job, common.follow(engine, job, f"job {job}"))


def delete(ctx: typer.Context, job: list[int] = typer.Argument(None, help="Job id(s)."),
           experiment: Optional[str] = typer.Option(None, "--experiment", help="Every job of this experiment."),
           artifacts: bool = typer.Option(False, "--artifacts", help="Remove the model files they trained too "
                                          "(default: kept in the artifact store)."),
           yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation.")):
    """Delete jobs with their results and logs, in one transaction; refused while one runs or is needed.

    A training's resumable checkpoints go with it (they are never a model of its own)."""
    from dsq import artifacts as store, jobs as lifecycle, trainstate
    from dsq.errors import InvalidArgument, JobStateError

    config = common.settings(ctx)
    with common.boundary():
        if bool(job) == bool(experiment):
            raise InvalidArgument("give either job ids or --experiment NAME")
        engine = common.database(config)
        with session_scope(engine) as session:
            ids = job or sorted(j.id for j in repo.list_jobs(session, limit=None, experiment=experiment))
            if not ids:
                raise JobStateError(f"no jobs in experiment {experiment!r}")
            trainings = [i for i in ids if repo.get_job(session, i).kind == "train"]
            found = lifecycle.delete(session, ids, config.stale_after, artifacts=artifacts)
            session.rollback()  # a dry run: the refusals, and what would go
        what = f"job{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))}"
        kept = f"; their {len(found)} artifact(s) {'too' if artifacts else 'are kept'}" if found else ""
        if not yes and not common.confirm(f"delete {what} with their results and logs{kept}?"):
            common.say("nothing deleted")
            raise typer.Exit(common.EXIT_FAILED)
        with session_scope(engine) as session:
            had = lifecycle.delete(session, ids, config.stale_after, artifacts=artifacts)
            files = [(a.location, a.sha256) for a in had if artifacts]
            unused = [f for f in files if not repo.artifact_in_use(session, f[1])]
    for location, sha256 in dict.fromkeys(unused):
        with common.boundary():
            store.remove(config, location, sha256)
    for training in trainings:
        with common.boundary():
            trainstate.remove(config, training)
    common.say(f"deleted {what}" + (f"; {'removed' if artifacts else 'kept'} {len(had)} artifact(s)" if had else ""))
