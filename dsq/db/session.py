"""Engines, sessions and schema upgrades.

Nothing here runs at import time: an engine exists only once ``make_engine`` or
``open_database`` is called with a URL, and the URL comes from the caller
(``default_database_url`` reads an environment mapping it is given).

SQLite files are opened in WAL mode with a 30 s busy timeout and foreign keys on,
so several processes (Ray workers, the CLI) can write the same file.  The sqlite3
driver's own transaction handling is kept on purpose: it begins a transaction
only at the first write, so a writer waits on the busy timeout instead of failing
with "database is locked" when another process committed since its last read.

A SQLite file this user cannot write is refused before anything connects (one line naming
the database, its ``-wal`` and ``-shm`` files and the folder, whichever are not writable),
so a refused open creates no ``-wal``/``-shm`` file: SQLite would create them with the
database file's own mode, and a read-only ``-shm`` left behind keeps every later write
failing after the user makes ``dsq.db`` writable again.  Callers that only read
(``read_only=True``) get a read-only connection instead, which creates nothing either.
"""

from __future__ import annotations

import os
import re
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Connection, Engine, create_engine, event, exc, inspect, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from dsq.errors import DatabaseUnreachable

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000  # a writer waits this long for another's lock: claims and upserts take milliseconds
PG_CONNECT_TIMEOUT_S = 5  # a server that does not answer in 5 s is down; the grace period (Settings) retries
RETRY_PAUSE_S = 1.0  # between two tries to reach a server that went away
# Any constant: serializes concurrent schema upgrades on one PostgreSQL database.
_PG_UPGRADE_LOCK = 0x647371
T = TypeVar("T")


def default_database_url(home: Path | None = None, env: Mapping[str, str] | None = None) -> str:
    """``DSQ_DATABASE_URL`` if set, else ``sqlite:///<home>/dsq.db``.

    ``home`` defaults to ``DSQ_HOME``, then ``~/.dsq``.  ``env`` defaults to
    ``os.environ``, read when called.
    """
    env = os.environ if env is None else env
    if env.get("DSQ_DATABASE_URL"):
        return env["DSQ_DATABASE_URL"]
    if home is None:
        home = Path(env.get("DSQ_HOME") or "~/.dsq")
    return f"sqlite:///{Path(home).expanduser() / 'dsq.db'}"


def mask_url(url: str | URL) -> str:
    """The URL as text with its password replaced by ``***``, even if it does not parse."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        head, at, host = str(url).rpartition("@")
        scheme, slashes, userinfo = head.rpartition("://")
        if not at or ":" not in userinfo:
            return str(url)
        return f"{scheme}{slashes}{userinfo.split(':', 1)[0]}:***@{host}"


def make_engine(url: str | URL, *, check: bool = True, retry_seconds: float = 0.0,
                read_only: bool = False) -> Engine:
    """An engine for a SQLite or PostgreSQL URL, connected once to check it works.

    Raises ``DatabaseUnreachable`` (one line, password masked) when the URL is
    malformed or unsupported, or the database cannot be reached, or it is a SQLite
    file this user cannot write (see ``unwritable``), unless ``read_only``: then
    such a file is opened read-only (``is_read_only``). With
    ``retry_seconds`` (job runners and workers), a PostgreSQL server that does not
    answer is asked again every second for that long before a connection fails:
    a restarted server costs a pause, not the job.
    """
    shown = mask_url(url)  # as the user wrote it, without the password
    parsed = _parse_url(url, shown)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        engine = _sqlite_engine(parsed, shown, read_only)
    elif backend == "postgresql":
        engine = _postgresql_engine(parsed, shown)
        if retry_seconds > 0:
            event.listen(engine, "do_connect", _patient_connect(retry_seconds))
    else:
        raise DatabaseUnreachable(f"unsupported database URL {shown}: use sqlite:///PATH or postgresql://...")
    if check:
        _check_connection(engine, shown)
    return engine


def _parse_url(url: str | URL, shown: str) -> URL:
    try:
        parsed = make_url(url)
    except Exception:
        raise DatabaseUnreachable(f"malformed database URL {shown}") from None
    if parsed.drivername in ("postgres", "postgresql"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def _sqlite_engine(url: URL, shown: str, read_only: bool = False) -> Engine:
    database = url.database or ""
    if database in ("", ":memory:"):
        engine = create_engine(url, poolclass=StaticPool, connect_args={"check_same_thread": False})
    else:
        path = Path(database).expanduser()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DatabaseUnreachable(f"cannot create {path.parent} for {shown}: {err}") from None
        timeout_s = SQLITE_BUSY_TIMEOUT_MS / 1000
        blocked = unwritable(path)
        if blocked and not (read_only and path.exists()):
            raise DatabaseUnreachable(f"cannot write to database {shown}: not writable by this user: "
                                      + ", ".join(blocked))
        if blocked:
            url = _read_only_url(url, path, shown, blocked)
        else:
            url = url.set(database=str(path))
        engine = create_engine(url, connect_args={"timeout": timeout_s})
    event.listen(engine, "connect", _configure_sqlite_connection)
    return engine


def _writable(path: Path) -> bool:
    return os.access(path, os.W_OK, effective_ids=os.access in os.supports_effective_ids)


def unwritable(path: Path) -> list[str]:
    """What keeps this user from writing the SQLite database ``path``, as words for an error line.

    The database file, its ``-wal`` and ``-shm`` files where they exist and cannot be
    written, and the folder when it cannot be written and one of the three must be
    created in it (SQLite creates ``-wal`` and ``-shm`` beside the file on first use).
    """
    files = [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]
    blocked = [str(file) for file in files if file.exists() and not _writable(file)]
    if not all(file.exists() for file in files) and path.parent.is_dir() and not _writable(path.parent):
        blocked.append(f"the folder {path.parent}")
    return blocked


def _read_only_url(url: URL, path: Path, shown: str, blocked: list[str]) -> URL:
    """A URL that reads ``path`` without writing or creating anything.

    With no commits waiting in the ``-wal`` file the database is opened ``immutable``
    (no ``-wal``/``-shm`` file is created, no lock taken); with some, read-only through
    the existing ``-wal`` and ``-shm``.  Commits waiting in a ``-wal`` whose ``-shm`` is
    gone cannot be read without creating it: one line says what to make writable.
    """
    wal, shm = path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")
    waiting = wal.exists() and wal.stat().st_size > 0
    if waiting and not shm.exists():
        raise DatabaseUnreachable(f"cannot read database {shown}: {wal} holds commits that only a writer can "
                                  f"read; not writable by this user: {', '.join(blocked)}")
    query = {"mode": "ro"} if waiting else {"immutable": "1"}
    return url.set(database=f"file:{urllib.parse.quote(str(path))}", query={**query, "uri": "true"})


def is_read_only(engine: Engine) -> bool:
    """Whether ``make_engine(..., read_only=True)`` opened this SQLite file read-only (it cannot be written)."""
    return engine.dialect.name == "sqlite" and bool({"mode", "immutable"} & set(engine.url.query))


def _configure_sqlite_connection(dbapi_connection, connection_record) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _postgresql_engine(url: URL, shown: str) -> Engine:
    try:
        return create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": PG_CONNECT_TIMEOUT_S})
    except Exception as err:  # missing driver, bad query arguments...
        raise DatabaseUnreachable(f"cannot use database {shown}: {_one_line(err)}") from None


def _patient_connect(retry_seconds: float):
    """A ``do_connect`` hook: connect, retrying refused connections for ``retry_seconds``."""
    def connect(dialect, connection_record, cargs, cparams):
        deadline = time.monotonic() + retry_seconds
        while True:
            try:
                return dialect.loaded_dbapi.connect(*cargs, **cparams)
            except dialect.loaded_dbapi.OperationalError as error:
                if not not_answering(error) or time.monotonic() >= deadline:
                    raise
                time.sleep(RETRY_PAUSE_S)
    return connect


PASSING_REFUSALS = ("the database system is", "too many clients", "remaining connection slots")


def not_answering(error: BaseException) -> bool:
    """Whether a driver's failure to connect means the server is not there to answer (down, restarting, starting up,
    shutting down), as opposed to a server that answered and refused (a bad password, a missing database)."""
    state = getattr(error, "sqlstate", None)
    if state is not None:
        return state[:2] in ("08", "57")  # connection exceptions, operator intervention
    # A failed connect carries no SQLSTATE: a server that refused says why in a FATAL line. Some refusals pass:
    # a server starting up or shutting down, and one out of connection slots.
    message = str(error)
    return "FATAL:" not in message or any(passing in message for passing in PASSING_REFUSALS)


def is_outage(error: BaseException) -> bool:
    """Whether an error means the database cannot be reached (as opposed to a refused statement)."""
    return isinstance(error, (exc.OperationalError, exc.InterfaceError)) or (
        isinstance(error, exc.DBAPIError) and error.connection_invalidated)


def riding_out(work: Callable[[], T], seconds: float, *, pause: float = RETRY_PAUSE_S) -> T:
    """``work()``, called again while it fails for an outage (``is_outage``), for up to ``seconds``.

    A statement cut off by a server that went away is retried once the server answers again; a
    refused statement is not. Past ``seconds`` the last outage error is raised.
    """
    deadline = time.monotonic() + seconds
    while True:
        try:
            return work()
        except exc.DBAPIError as error:
            if not is_outage(error) or time.monotonic() >= deadline:
                raise
        time.sleep(pause)


def database_back(engine: Engine, seconds: float) -> bool:
    """Whether the database answers within ``seconds`` (after an outage: go on, or give up)."""
    def ping() -> None:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    try:
        riding_out(ping, seconds)
    except exc.DBAPIError as error:
        if not is_outage(error):
            raise
        return False
    return True


def _check_connection(engine: Engine, shown: str) -> None:
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except exc.SQLAlchemyError as err:
        engine.dispose()
        reason = _one_line(getattr(err, "orig", None) or err)
        if engine.url.password:
            reason = reason.replace(str(engine.url.password), "***")
        verb = "write to" if "readonly" in reason or "read-only" in reason else "reach"
        transient = engine.url.get_backend_name() == "postgresql" and isinstance(err, exc.OperationalError) and \
            not_answering(err.orig)
        raise DatabaseUnreachable(f"cannot {verb} database {shown}: {reason}", transient=transient) from None


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session whose transaction commits when the block ends and rolls back on error.

    Objects stay readable after the commit (``expire_on_commit=False``).
    """
    session = sessionmaker(engine, expire_on_commit=False)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(connection: Connection | None = None):
    """An Alembic configuration for ``migrations/``, sharing ``connection`` if given."""
    from alembic.config import Config  # only to upgrade: every command opens a database, few upgrade one

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def upgrade(engine_or_url: Engine | str, revision: str = "head") -> None:
    """Upgrade the schema to ``revision`` (Alembic ``upgrade``), safe to run concurrently."""
    from alembic import command

    engine = make_engine(engine_or_url) if isinstance(engine_or_url, (str, URL)) else engine_or_url
    with engine.begin() as connection:
        _lock_for_upgrade(connection)
        command.upgrade(alembic_config(connection), revision)


def _lock_for_upgrade(connection: Connection) -> None:
    """Hold the database's write lock so two first uses do not both create the tables."""
    if connection.dialect.name == "sqlite":
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    elif connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_UPGRADE_LOCK})


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None for an empty database): Alembic's one-row table, read directly."""
    with engine.connect() as connection:
        if not inspect(connection).has_table("alembic_version"):
            return None
        return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()


_REVISION = re.compile(r"^revision(?:: *str)? *= *[\"']([^\"']+)[\"']", re.MULTILINE)
_DOWN_REVISION = re.compile(r"^down_revision(?:: *[^=]+)? *= *(?:None|[\"']([^\"']+)[\"'])", re.MULTILINE)


def head_revision() -> str | None:
    """The newest revision under ``migrations/``: the one no other revision names as its ``down_revision``.

    Read from the files' assignments rather than through Alembic, whose import and script loading cost every
    command a few hundred milliseconds (tests/test_db.py checks that Alembic finds the same head)."""
    revisions, downs = set(), set()
    for path in (MIGRATIONS_DIR / "versions").glob("*.py"):
        source = path.read_text()
        found, down = _REVISION.search(source), _DOWN_REVISION.search(source)
        if found:
            revisions.add(found.group(1))
            if down and down.group(1):
                downs.add(down.group(1))
    heads = revisions - downs
    if len(heads) > 1:
        raise RuntimeError(f"migrations/ has several heads: {', '.join(sorted(heads))}")
    return heads.pop() if heads else None


def open_database(url: str | URL, *, retry_seconds: float = 0.0, read_only: bool = False) -> Engine:
    """An engine for ``url`` whose schema is upgraded to the newest revision.

    ``read_only``: the caller only reads, so a SQLite file this user cannot write is
    opened read-only rather than refused, if its schema needs no upgrade.
    """
    engine = make_engine(url, retry_seconds=retry_seconds, read_only=read_only)
    if current_revision(engine) != head_revision():
        if is_read_only(engine):
            engine.dispose()
            path = Path(urllib.parse.unquote(engine.url.database.removeprefix("file:")))
            raise DatabaseUnreachable(f"cannot read database {mask_url(url)}: its schema needs an upgrade; not "
                                      f"writable by this user: {', '.join(unwritable(path))}")
        upgrade(engine)
    return engine
