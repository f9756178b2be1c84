"""``dsq dashboard``: serve the queue and the results in a browser until Ctrl-C or SIGTERM (no torch, no Ray)."""

from __future__ import annotations

import dataclasses
import os
import secrets
import socket
from typing import Optional

import typer

from cli import common
from dsq.errors import InvalidArgument

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
DEFAULT_PORT = 8750


def register(app: typer.Typer) -> None:
    app.command()(dashboard)
    app.command()(report)


def dashboard(ctx: typer.Context,
              host: str = typer.Option("127.0.0.1", help="Address to listen on. Any but this machine's loopback "
                                       "needs a token (--token, or one is made and printed)."),
              port: int = typer.Option(DEFAULT_PORT, help="Port to listen on (0: any free port)."),
              token: Optional[str] = typer.Option(None, help="Every request must carry it: Authorization: Bearer "
                                                  "TOKEN, or ?token=TOKEN once (it sets a cookie). Default: none on "
                                                  "127.0.0.1, a new random one on any other address."),
              database: Optional[str] = typer.Option(None, "--db", help="Database URL (default: dsq's --db).")):
    """Serve the queue (live), each job's results and curves, experiments and images in a browser; read-only."""
    import uvicorn

    from dsq.dashboard.app import create_app

    config = common.settings(ctx)
    with common.boundary():
        if not 0 <= port <= 65535:
            raise InvalidArgument(f"--port must be between 0 and 65535, got {port}")
        if token is not None and len(token) < 16:
            raise InvalidArgument("--token must be at least 16 characters (or leave it out: one is made)")
        if database is not None:
            config = dataclasses.replace(config, database_url=database)
        if token is None and host not in LOCAL_HOSTS:
            token = secrets.token_urlsafe(24)
        engine = common.database(config, write=False)
        app = create_app(engine, config.stale_after, token=token)
        listening = _listen(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    shown = f"[{host}]" if ":" in host else host
    common.say(f"dsq dashboard at http://{shown}:{listening.getsockname()[1]}/" + (f"?token={token}" if token else "")
               + " (Ctrl-C stops it)")
    with common.StopSignals(stop=lambda name: setattr(server, "should_exit", True)) as signals:
        server.run(sockets=[listening])  # uvicorn takes the signals while it serves, then raises them again to us
    engine.dispose()
    if signals.number is not None:
        common.say("dashboard stopped", err=True)
        raise common.signal_exit(signals.number)


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port``: one clear line (exit 2) when it cannot be, before anything is served."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listening = socket.socket(family, socket.SOCK_STREAM)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listening.bind((host, port))
    except (OSError, OverflowError) as error:
        listening.close()
        raise InvalidArgument(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return listening


def report(ctx: typer.Context,
           html: str = typer.Option(..., "--html", help="The file to write: one HTML page, plotly.js inside it."),
           experiment: Optional[str] = typer.Option(None, help="An experiment's curves and tables (as "
                                                    "dsq results --experiment NAME --by-sigma)."),
           job: Optional[int] = typer.Option(None, help="One job's page: its table, curve, spec and log."),
           linf: bool = typer.Option(False, "--linf", help="Radii in L∞: R / sqrt(d).")):
    """Write the dashboard's page of an experiment or a job as one self-contained HTML file (no server, no
    network): to share, or to attach to a paper."""
    from dsq.dashboard import pages, render
    from dsq.db.models import utcnow
    from dsq.db.session import session_scope

    config = common.settings(ctx)
    with common.boundary():
        if (job is None) == (experiment is None):
            raise InvalidArgument("give --experiment NAME or --job N (one of them)")
        if not html.lower().endswith((".html", ".htm")):
            raise InvalidArgument(f"cannot write {html}: its name must end in .html")
        folder = os.path.dirname(os.path.abspath(html))
        if not os.path.isdir(folder):
            raise InvalidArgument(f"cannot write {html}: folder {folder} does not exist")
        engine = common.database(config, write=False)
        with session_scope(engine) as session:
            if experiment is not None:
                text = render.page("experiment.html", inline=True, **pages.experiment(session, experiment, linf=linf))
            else:
                found = pages.job(session, job, utcnow(), config.stale_after, linf=linf)
                text = render.page("job.html", inline=True, **found)
        partial = f"{html}.partial"
        with open(partial, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(partial, html)  # never a half-written report
    common.say(f"report written to {html} ({len(text) / 1e6:.1f} MB, plotly.js inside)")
