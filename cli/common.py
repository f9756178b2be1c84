"""What every command shares: settings, the error boundary, following a job, signals.

Heavy imports (torch, Ray) happen inside the commands that need them, so the commands that only
read the database answer at once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from typing import Callable, Iterator

import typer
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.table import Column
from rich.text import Text

from sqlalchemy import exc

from dsq.checks import first_line
from dsq.db import repo
from dsq.db.session import mask_url, open_database, session_scope
from dsq.errors import DsqError
from dsq.settings import Settings

# Piped or captured output is never cut to a terminal's 80 columns.
console = Console(width=None if sys.stdout.isatty() else 200)
errors = Console(stderr=True, width=None if sys.stderr.isatty() else 200)
EXIT_FAILED, EXIT_BAD_INPUT = 1, 2


def settings(ctx: typer.Context) -> Settings:
    return ctx.obj


def say(line: str, *, err: bool = False) -> None:
    """Print a line as it is (no markup, no highlighting)."""
    (errors if err else console).print(line, markup=False, highlight=False, soft_wrap=True)


@contextlib.contextmanager
def boundary() -> Iterator[None]:
    """Turn a dsq error into one line on stderr and exit code 2."""
    try:
        yield
    except DsqError as error:
        from dsq.text import escape_controls

        say(f"error: {escape_controls(str(error))}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except exc.DBAPIError as error:  # a read-only file, a full disk, a server that went away...
        reason = first_line(error.orig or error)
        where = OPENED[-1] if OPENED else "the database"
        verb = "cannot write to" if "readonly" in reason or "read-only" in reason else "error from"
        say(f"error: {verb} database {where}: {reason}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None



def stdin_is_terminal() -> bool:
    return sys.stdin.isatty()


def confirm(question: str) -> bool:
    """Ask on the terminal; without one, refuse (exit 2) unless the command was given --yes."""
    if not stdin_is_terminal():
        say("error: no terminal to confirm on: pass --yes to go ahead without asking", err=True)
        raise typer.Exit(EXIT_BAD_INPUT)
    return typer.confirm(question, default=False)


OPENED: list[str] = []  # the database this command opened (password masked), named in its error lines


def database(config: Settings, *, write: bool = True):
    """The engine, with migrations applied (first use creates the schema).

    A SQLite file this user cannot write is refused in one line (exit 2) before anything connects, unless the
    command only reads (``write=False``): it then reads the file read-only.
    """
    OPENED.append(mask_url(config.database_url))
    return open_database(config.database_url, read_only=not write)


def check_cluster(config: Settings) -> None:
    """Fail fast (exit 2, nothing written) when the configured Ray address does not answer."""
    if config.ray_address:
        from workers import resources

        resources.check_reachable(config.ray_address)


class Stopped(BaseException):
    """SIGINT or SIGTERM arrived (a BaseException, like KeyboardInterrupt: no ``except Exception`` swallows it)."""

    def __init__(self, number: int):
        super().__init__(signal.Signals(number).name)
        self.number = number


def signal_exit(number: int) -> typer.Exit:
    """The exit of a long-running command stopped by signal ``number``, after its own stop line: 128 + N (130 on
    SIGINT, 143 on SIGTERM), what a shell reports for a process the signal ended."""
    return typer.Exit(128 + number)


class StopSignals:
    """SIGINT and SIGTERM within a long-running command (worker, demo, --wait, --follow, emulate).

    Each calls ``stop(name)`` (a worker stops claiming and hands its jobs back) or, without ``stop``, raises
    ``Stopped`` where the command is; ``number`` keeps the first one, for ``signal_exit``. Ray's start replaces the
    SIGTERM handler with its own (a C++ stack dump): call ``install()`` again once Ray is connected.
    """

    def __init__(self, stop: Callable[[str], None] | None = None, *, at_waits: bool = False):
        self.stop, self.number = stop, None
        self.raising = not at_waits  # at_waits: raise only inside wait(), never within a database call or a print
        self.previous: dict[int, object] = {}

    def install(self) -> None:
        for number in (signal.SIGINT, signal.SIGTERM):
            old = signal.signal(number, self._handle)
            self.previous.setdefault(number, old)

    def _handle(self, number: int, frame) -> None:
        if self.number is None:
            self.number = number
        if self.stop is not None:
            self.stop(signal.Signals(number).name)
        elif self.raising:
            raise Stopped(number)

    def wait(self, seconds: float) -> None:
        """Sleep ``seconds``: where a signal kept by ``at_waits`` (or one that arrives now) raises ``Stopped``."""
        self.raising = True
        try:
            self.check()
            time.sleep(seconds)
        finally:
            self.raising = False

    def check(self) -> None:
        """Raise ``Stopped`` if a signal has arrived."""
        if self.number is not None and self.stop is None:
            raise Stopped(self.number)

    def __enter__(self) -> "StopSignals":
        self.install()
        return self

    def __exit__(self, *exc_info) -> None:
        for number, old in self.previous.items():
            signal.signal(number, old)


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM raise ``Stopped`` (no traceback, no Ray signal dump)."""
    with StopSignals():
        yield


def stopped_following(stop: Stopped, job_id: int) -> typer.Exit:
    """A signal while following a job: one line, exit 128 + N; the job goes on."""
    say(f"{stop}: stopped following job {job_id}; it goes on (dsq status {job_id})", err=True)
    return signal_exit(stop.number)


@contextlib.contextmanager
def following(job_id: int) -> Iterator[StopSignals]:
    """Ctrl-C or SIGTERM while following a job's output (--follow) stops following it: one line, exit 128 + N.

    The signal takes effect at the block's next ``wait`` (or its end), never inside a database call: a commit cut
    in its middle would end in SQLAlchemy's traceback instead of that line."""
    try:
        with StopSignals(at_waits=True) as signals:
            yield signals
            signals.check()
    except Stopped as stop:
        raise stopped_following(stop, job_id) from None


class JobColumn(ProgressColumn):
    """A certification's line (images, img/s, certified, ETA), else done/total, elapsed and remaining (training)."""

    def __init__(self, table_column=None):
        super().__init__(table_column)
        self.plain = (MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())

    def render(self, task) -> Text:
        line = task.fields.get("line")
        return Text(line) if line else Text(" ").join(column.render(task) for column in self.plain)


def progress_bar() -> Progress:
    """One line within the terminal's width: the description takes at most a quarter of it and the job's line what
    it needs, each cut (…) rather than wrapped; the bar takes what is left."""
    def one_line(**width) -> Column:
        return Column(no_wrap=True, overflow="ellipsis", **width)

    return Progress(TextColumn("{task.description}", table_column=one_line(max_width=max(16, errors.width // 4))),
                    BarColumn(bar_width=None, table_column=Column(min_width=4, max_width=40)),
                    JobColumn(table_column=one_line()), console=errors, transient=False,
                    disable=not sys.stderr.isatty() and os.environ.get("DSQ_PROGRESS") != "1")


FOLLOW_GRACE_S = 60.0  # --wait rides out a database restart this long


def follow(engine, job_id: int, label: str) -> str:
    """Poll a job until it ends, with a progress bar; return its status. A signal stops following only."""
    from dsq import views
    from dsq.db.models import utcnow

    lost_since = None
    with following(job_id) as signals, progress_bar() as bar:
        task = bar.add_task(label, total=None, line=None)
        while True:
            try:
                with session_scope(engine) as session:
                    job = repo.get_job(session, job_id)
                    last = repo.logs_for_job(session, job_id)[-1:]
                    line = views.progress_line(session, job, utcnow())
            except exc.OperationalError:
                lost_since = lost_since or time.monotonic()
                if time.monotonic() - lost_since > FOLLOW_GRACE_S:
                    say(f"error: database unreachable for {FOLLOW_GRACE_S:.0f} s: stopped following job "
                        f"{job_id}; `dsq status {job_id}` once it is back", err=True)
                    raise typer.Exit(EXIT_FAILED) from None
                signals.wait(1.0)
                continue
            lost_since = None
            doing = f": {last[0].message[:60]}" if last and job.status == "running" else ""
            bar.update(task, completed=job.progress_done, total=job.progress_total or None,
                       description=f"{label} ({job.status}{doing})", line=line)
            if job.finished:
                return job.status
            signals.wait(1.0)


def finish(engine, job_id: int, status: str) -> None:
    """Report a job's end; exit 1 unless it succeeded."""
    with session_scope(engine) as session:
        job = repo.get_job(session, job_id)
    if status == "succeeded":
        console.print(f"job {job_id} succeeded")
        return
    said = "stopped at its query budget" if status == "budget" else status
    say(f"job {job_id} {said}" + (f": {job.error}" if job.error else ""), err=True)
    raise typer.Exit(EXIT_FAILED)
