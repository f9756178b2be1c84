"""Shared fixtures."""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, make_url, text

from dsq.db.session import open_database

# ---------------------------------------------------------------------------------------
# Databases: a temp SQLite file, and a throw-away PostgreSQL server for the session.
#
# The server is started with the PostgreSQL binaries found in $DSQ_PG_BIN, on PATH, or
# under /usr/lib/postgresql/*/bin (Debian's `postgresql` package).  As root it runs as
# the `postgres` user (initdb refuses root).  It fails the tests, never skips them, when
# it cannot start.  DSQ_TEST_POSTGRES_URL=postgresql://... uses an existing server instead.
# ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pg_bin() -> Path:
    candidates = [os.environ.get("DSQ_PG_BIN", "")]
    on_path = shutil.which("pg_ctl")
    candidates.append(str(Path(on_path).parent) if on_path else "")
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True)
    for candidate in filter(None, candidates):
        if (Path(candidate) / "initdb").exists() and (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) not found: install Debian's `postgresql`")


def _as_postgres(args: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return args
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.fail("running as root and there is no `postgres` user to run the PostgreSQL server")
    return ["su", "postgres", "-c", shlex.join(args)]


def _run(args: list[str], what: str, log: Path | None = None) -> None:
    done = subprocess.run(_as_postgres(args), capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        extra = log.read_text() if log and log.exists() else ""
        pytest.fail(f"{what} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}\n{extra}")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """URL (no database name) of a PostgreSQL server that lives for the test session."""
    if os.environ.get("DSQ_TEST_POSTGRES_URL"):
        yield os.environ["DSQ_TEST_POSTGRES_URL"].rstrip("/")
        return
    bin_dir, port = _pg_bin(), free_port()
    root = Path(tempfile.mkdtemp(prefix="dsq-pg-"))
    data, log = root / "data", root / "server.log"
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
    try:
        _run([str(bin_dir / "initdb"), "-A", "trust", "-U", "postgres", "-D", str(data), "--no-sync"], "initdb")
        pg_ctl = [str(bin_dir / "pg_ctl"), "-D", str(data)]
        _run([*pg_ctl, "-l", str(log), "-o", options, "-w", "-t", "30", "start"], "pg_ctl start", log)
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        if (data / "postmaster.pid").exists():
            stop = [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]
            subprocess.run(_as_postgres(stop), capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


_database_numbers = itertools.count()


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """URL of a fresh, empty database on the session's PostgreSQL server, dropped afterwards."""
    name = f"dsq_test_{os.getpid()}_{next(_database_numbers)}"
    admin_url = make_url(f"{postgres_server}/postgres").set(drivername="postgresql+psycopg")
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        yield f"{postgres_server}/{name}"
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'dsq.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> str:
    """URL of an empty database, once for each supported dialect."""
    return request.getfixturevalue(f"{request.param}_url")


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """An engine for an empty database upgraded to the newest schema."""
    engine = open_database(db_url)
    yield engine
    engine.dispose()


# ---------------------------------------------------------------------------------------
# Ray: one real local Ray for the whole session (starting one takes seconds), on
# loopback, token auth off for every driver and node the tests start.
# ---------------------------------------------------------------------------------------

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, namespace="dsq", logging_level="ERROR",
                 _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


@pytest.fixture
def settings(tmp_path: Path):
    """dsq settings with a fresh home folder and SQLite database."""
    from dsq.settings import Settings

    home = tmp_path / "dsq-home"
    return Settings(database_url=f"sqlite:///{home / 'dsq.db'}", home=home)
