"""The ``dsq`` command: submit jobs, follow them, query their results."""

from __future__ import annotations

import os
from typing import Optional

import typer

from cli import api, bench, cluster, common, dashboard, db, demo, jobs, results, submit, worker
from dsq.settings import Settings

app = typer.Typer(help="dsq: certified robustness for any image classifier by denoised smoothing, as Ray jobs.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = version("dsq")
        except PackageNotFoundError:
            found = "unknown (not installed)"
        typer.echo(f"dsq {found}")
        raise typer.Exit()


@app.callback()
def main(ctx: typer.Context,
         version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print dsq's version and exit."),
         database: Optional[str] = typer.Option(None, "--db", help="Database URL (default: $DSQ_DATABASE_URL, "
                                                "else sqlite:///$DSQ_HOME/dsq.db, DSQ_HOME=~/.dsq)."),
         address: Optional[str] = typer.Option(None, "--address", help="Ray cluster address (default: "
                                               "$RAY_ADDRESS, else a local Ray started by the worker).")):
    with common.boundary():
        ctx.obj = Settings.from_env(os.environ, db=database, address=address)


app.add_typer(submit.app, name="submit")
app.command(name="preview", context_settings={"ignore_unknown_options": True})(submit.preview)  # image -1: one line
api.register(app, submit.app)
app.add_typer(db.app, name="db")
jobs.register(app)
results.register(app)
demo.register(app)
cluster.register(app)
bench.register(app)
dashboard.register(app)
worker.register(app)
