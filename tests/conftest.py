"""Shared fixtures, and the suite's four layers (see "Running the tests" in README.md)."""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import itertools
import json
import multiprocessing.util
import os
import pwd
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, make_url, text

from dsq.db.session import open_database
from workers.ports import free_port, ray_node_ports  # noqa: F401 - the tests import them from here

# The digits classifier that end-to-end tests train where only its being a classifier matters: small_cnn at a quarter
# of its width (8 first-layer channels), about 7x cheaper per Monte-Carlo sample. Their jobs must run long enough for
# a signal or a fault to land mid-job; with this net that takes a fraction of the CPU. `dsq submit train` options.
NARROW = ["--arch", "small_cnn", "--arch-kwargs", '{"width": 8}']


def slow(seconds: float = 0.02, hold: Path | None = None) -> list[str]:
    """`dsq submit certify` options for a digits classifier that needs no training and sleeps ``seconds`` per batch,
    and for as long as the file ``hold`` exists (tests/slownet.py): for jobs that must last until a signal or a fault
    lands, in wall-clock time rather than CPU."""
    args = {"seconds": seconds, **({"hold": str(hold)} if hold else {})}
    return ["--classifier", "tests.slownet:build", "--classifier-args", json.dumps(args)]

# ---------------------------------------------------------------------------------------
# Databases: a temp SQLite file, and a throw-away PostgreSQL server for the session.
#
# DSQ_TEST_POSTGRES_URL=postgresql://... uses an existing server.  Otherwise the tests start
# one with the server binaries (initdb, pg_ctl) of $DSQ_PG_BIN if set, else those shipped in
# the `pgserver` wheel (a requirement: `make test` needs nothing but Python), else on PATH
# or under /usr/lib/postgresql/*/bin (Debian's `postgresql`).  initdb refuses root: as root
# the server runs as the `postgres` user if there is one, else as `pgserver`, made as
# pgserver itself does when run as root (useradd, and read and traverse rights on its
# binaries for that user).  It fails the tests, never skips them, when it cannot start.
# ---------------------------------------------------------------------------------------


def _pgserver_bin() -> Path | None:
    """The folder of the PostgreSQL binaries in the pgserver wheel (None if it is not installed).

    Found without importing pgserver, whose import looks up a runtime folder and warns without one.
    """
    spec = importlib.util.find_spec("pgserver")
    return Path(spec.origin).parent / "pginstall" / "bin" if spec and spec.origin else None


def _pg_bin() -> Path:
    candidates = [os.environ.get("DSQ_PG_BIN", ""), str(_pgserver_bin() or "")]
    on_path = shutil.which("pg_ctl")
    candidates.append(str(Path(on_path).parent) if on_path else "")
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True)
    for candidate in filter(None, candidates):
        if (Path(candidate) / "initdb").exists() and (Path(candidate) / "pg_ctl").exists():
            return Path(candidate)
    pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) not found: `pip install pgserver` "
                "(in requirements.txt) or install Debian's `postgresql`")


def _server_user(bin_dir: Path) -> pwd.struct_passwd | None:
    """The user who runs the server: None (this process's) unless it is root."""
    if os.geteuid() != 0:
        return None
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        user = None
    if bin_dir == _pgserver_bin():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from pgserver import utils

        user = user or utils.ensure_user_exists("pgserver")
        utils.ensure_prefix_permissions(bin_dir)
        utils.ensure_folder_permissions(bin_dir, stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH)
        utils.ensure_folder_permissions(bin_dir.parent / "lib", stat.S_IRGRP | stat.S_IROTH)
    if user is None:
        pytest.fail("running as root and there is no `postgres` user to run the PostgreSQL server "
                    "(`pip install pgserver` makes one)")
    return user


def _run_as(user: pwd.struct_passwd | None, args: list[str]) -> subprocess.CompletedProcess:
    as_user = dict(user=user.pw_uid, group=user.pw_gid, extra_groups=[]) if user else {}
    return subprocess.run(args, capture_output=True, text=True, timeout=60, cwd="/", **as_user)


def _run(args: list[str], what: str, user: pwd.struct_passwd | None, log: Path | None = None) -> None:
    done = _run_as(user, args)
    if done.returncode != 0:
        extra = log.read_text() if log and log.exists() else ""
        pytest.fail(f"{what} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}\n{extra}")


class PgServer:
    """A throw-away PostgreSQL server on 127.0.0.1 in a temp folder; it can be stopped and started again."""

    def __init__(self):
        self.bin_dir, self.port = _pg_bin(), free_port()
        self.user = _server_user(self.bin_dir)
        self.root = Path(tempfile.mkdtemp(prefix="dsq-pg-"))
        self.data, self.log = self.root / "data", self.root / "server.log"
        if self.user is not None:
            os.chown(self.root, self.user.pw_uid, self.user.pw_gid)
        self.pg_ctl = [str(self.bin_dir / "pg_ctl"), "-D", str(self.data)]
        _run([str(self.bin_dir / "initdb"), "-A", "trust", "-U", "postgres", "-D", str(self.data), "--no-sync"],
             "initdb", self.user)
        self.start()

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}"

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
        _run([*self.pg_ctl, "-l", str(self.log), "-o", options, "-w", "-t", "30", "start"], "pg_ctl start",
             self.user, self.log)

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            _run_as(self.user, [*self.pg_ctl, "-m", "immediate", "-w", "stop"])

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """URL (no database name) of a PostgreSQL server that lives for the test session."""
    if os.environ.get("DSQ_TEST_POSTGRES_URL"):
        yield os.environ["DSQ_TEST_POSTGRES_URL"].rstrip("/")
        return
    server = PgServer()
    try:
        yield server.url
    finally:
        server.remove()


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

os.environ["RAY_AUTH_MODE"] = "disabled"  # the same for every driver and node, whatever the caller's environment
# A node starts no idle Python workers ahead of need (one per CPU at its start and at its first driver's): the tests
# start many short-lived nodes, whose jobs run in actors that start workers of their own anyway.
os.environ["RAY_enable_worker_prestart"] = "0"
os.environ["RAY_prestart_worker_first_driver"] = "0"
# Nor do the nodes collect metrics for a dashboard that no test starts: an idle node then costs about a third less
# CPU (its agent also looks for its raylet every 5 s instead of 0.4 s), and the suite keeps several nodes idle.
os.environ |= {"RAY_enable_metrics_collection": "0", "METRICS_RECORD_INTERVAL_S": "60",
               "REPORTER_UPDATE_INTERVAL_MS": "60000", "RAY_DASHBOARD_AGENT_CHECK_PARENT_INTERVAL_S": "5"}
# Background workers that `dsq submit` starts exit soon after the queue is empty, not minutes later.
os.environ.setdefault("DSQ_WORKER_IDLE_SECONDS", "10")


@pytest.fixture(scope="session")
def ray_session(session_ray: str) -> Iterator[None]:
    """This process is a driver of the session's Ray (``session_ray``), for tests that run jobs and actors
    in-process."""
    import ray

    if not ray.is_initialized():
        ray.init(address=session_ray, namespace="dsq", logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """The actor processes that the jobs of a test kept (``tests.test_jobs.ACTORS``) end with it, so that idle
    actors never hold the CPUs that the actors of the next test (its own, outside the pool) need."""
    kept = sys.modules.get("tests.test_jobs")
    if kept is not None and kept.ACTORS.idle and sys.modules["ray"].is_initialized():
        kept.ACTORS.close()


READY = """
import sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
while not ray.cluster_resources().get("CPU"):
    time.sleep(0.2)
"""


def _start_head(temp: Path, cpus: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    with open(temp / "head.log", "w") as log:
        head = subprocess.Popen(
            [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}",
             "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}", "--memory=4000000000",
             "--object-store-memory=400000000", "--include-dashboard=false", "--disable-usage-stats",
             "--include-log-monitor=false",  # it sends the nodes' logs to drivers, and dsq's drivers take none
             f"--temp-dir={temp}", f"--ray-client-server-port={free_port()}", *ray_node_ports()],
            env=os.environ | {"RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ""}, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True, cwd=temp)
    return head, f"127.0.0.1:{port}"


@contextlib.contextmanager
def _ray_head(cpus: int) -> Iterator[str]:
    """A one-node Ray, `ray start`ed on its own ports with ``cpus`` logical CPUs: its address, until it is stopped by
    its process group."""
    temp = Path(tempfile.mkdtemp(prefix="dsq-ray-"))  # short: Ray's socket paths have a length limit
    head, address = _start_head(temp, cpus)
    try:
        deadline = time.monotonic() + 300  # generous: a busy machine starts a node in tens of seconds
        while True:
            assert time.monotonic() < deadline, \
                f"the session's Ray did not start: {(temp / 'head.log').read_text()[-3000:]}"
            if head.poll() is not None:  # `ray start` gives its raylet 30 s, which a busy machine can exceed: again
                _stop_group(head)
                head, address = _start_head(temp, cpus)
            try:
                if subprocess.run([sys.executable, "-c", READY, address], capture_output=True,
                                  timeout=120).returncode == 0:
                    break
            except subprocess.TimeoutExpired:
                pass
            time.sleep(1)
        yield address
    finally:
        _stop_group(head, grace=5)  # `ray start --block` often outlasts 20 s of SIGTERM; nothing of it is kept
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="session")
def session_ray() -> Iterator[str]:
    """The address of one Ray for the whole session of this pytest process, `ray start`ed on this machine like a
    local Ray (as many CPUs). Its tests' in-process jobs (``ray_session``) and `dsq` processes (``local_ray``) share
    it: one node kept for the session instead of two (an idle node costs a few seconds of CPU a minute). Stopped by
    its process group at the end."""
    with _ray_head(os.cpu_count()) as address:
        yield address


@pytest.fixture(scope="session")
def local_ray(session_ray: str, starts_processes) -> str:
    """The session's Ray, for the `dsq` processes of the tests which ask for it (``joins_local_ray``): they join it
    instead of each starting a local Ray of its own (seconds and hundreds of MB each)."""
    return session_ray


@pytest.fixture(scope="module")
def roomy_ray(starts_processes) -> Iterator[str]:
    """A second Ray with more logical CPUs than cores, for several `dsq worker` processes at once: each keeps its
    sampler actors (half a CPU each) for its next job, which on ``local_ray`` would hold the CPUs the other workers'
    actors wait for. One module uses it: it ends with that module, not idle to the end of the session."""
    with _ray_head(6) as address:
        yield address


def _stop_group(process: subprocess.Popen, grace: float = 20) -> None:
    """Stop a process started with start_new_session=True and whatever it started: SIGTERM, then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.fixture
def joins_local_ray(local_ray: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The `dsq` processes this test starts join the session's Ray (``local_ray``) instead of starting their own:
    for tests about the queue, workers and jobs, not about a local Ray's own start and end."""
    monkeypatch.setenv("DSQ_LOCAL_RAY_ADDRESS", local_ray)
    return local_ray


@pytest.fixture
def settings(tmp_path: Path):
    """dsq settings with a fresh home folder and SQLite database."""
    from dsq.settings import Settings

    home = tmp_path / "dsq-home"
    return Settings(database_url=f"sqlite:///{home / 'dsq.db'}", home=home)


# ---------------------------------------------------------------------------------------
# Layers: every test gets exactly one of the markers below (registered in pyproject.toml),
# so that `pytest -m unit` runs in well under a minute and `-m "not e2e"` skips the slow
# end-to-end runs (README.md, "Running the tests").  A test's layer is the highest of
#   - the layers of the fixtures it uses, directly or through other fixtures (FIXTURE_LAYERS:
#     the database fixtures, ray_session, and the two declarations below, which a test
#     module's own fixture requests to say what it does);
#   - a layer marker on the test, its class or its module (`pytestmark = pytest.mark.e2e`),
#     for what no fixture shows (a subprocess, a database opened by the test itself, a
#     fixture asked for by name with request.getfixturevalue);
#   - unit, when neither says more.
# A marker lower than what the test's fixtures imply is an error at collection.  While a
# test runs, what its layer excludes raises LayerViolation and fails the test, even where
# the test catches the error: a unit test opens no database, a unit or db test uses no Ray,
# and only an e2e test starts a process (other than the system queries in SYSTEM_COMMANDS).
# ---------------------------------------------------------------------------------------

LAYERS = ("unit", "db", "ray", "e2e")
FIXTURE_LAYERS = {"sqlite_url": "db", "postgres_url": "db", "postgres_server": "db", "db_url": "db", "engine": "db",
                  "opens_database": "db", "ray_session": "ray", "starts_processes": "e2e"}
# What libraries run for themselves (platform.uname() asks `uname -p`, matplotlib asks fontconfig, ...).
SYSTEM_COMMANDS = {"uname", "file", "ldconfig", "fc-list", "fc-match", "lsb_release", "nvidia-smi"}
_LAYER = pytest.StashKey[str]()


@pytest.fixture(scope="session")
def opens_database() -> None:
    """Declares that a test (or a fixture) opens a database of its own: layer db at least."""


@pytest.fixture(scope="session")
def starts_processes() -> None:
    """Declares that a test (or a fixture) starts processes: CLI runs, workers, Ray nodes. Layer e2e."""


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by layer and before xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    conflicts = []
    for item in items:
        marked = {mark.name for mark in item.iter_markers() if mark.name in LAYERS}
        implied = {FIXTURE_LAYERS[name] for name in getattr(item, "fixturenames", ()) if name in FIXTURE_LAYERS}
        layer = max(marked | implied | {"unit"}, key=LAYERS.index)
        if marked - {layer}:
            conflicts.append(f"{item.nodeid}: marked {', '.join(sorted(marked - {layer}))}, but its fixtures or "
                             f"markers make it {layer}")
        if layer not in marked:
            item.add_marker(layer)
        item.stash[_LAYER] = layer
    if conflicts:
        raise pytest.UsageError("tests marked with a layer below their own:\n  " + "\n  ".join(conflicts))
    _schedule(items)


# Rough seconds a test of each layer takes on 2 cores: enough to order the work, longest first.
LAYER_COST = {"unit": 0.1, "db": 1, "ray": 5, "e2e": 30}
# Where the `pytest -n` workers tell the controller which tests share a module-scoped fixture (see _schedule).
GROUPS_FILE = "DSQ_TEST_GROUPS_FILE"


def _schedule(items: list[pytest.Item]) -> None:
    """Make the suite easy to share among `pytest -n` workers (README.md, "Running the tests").

    Tests that share a module-scoped fixture form one group, which one worker runs, so that the fixture is set up
    once. The work units (a group, or a test on its own) run longest first, by LAYER_COST, so that short tests fill
    the end of the run instead of one long test starting last. Without xdist only the order changes.
    """
    cost: dict[str, float] = {}
    scope_of = {}
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        shares = info is not None and any(defs[-1].scope == "module" for defs in info.name2fixturedefs.values())
        scope_of[item] = item.module.__name__ if shares and item.module is not None else item.nodeid
        cost[scope_of[item]] = cost.get(scope_of[item], 0) + LAYER_COST[item.stash[_LAYER]]
    order = {item: index for index, item in enumerate(items)}
    first: dict[str, int] = {}
    for item in items:
        first.setdefault(scope_of[item], order[item])
    items.sort(key=lambda item: (-cost[scope_of[item]], first[scope_of[item]], order[item]))
    if GROUPS_FILE in os.environ:  # a worker: every worker collects the same, so any one of them may write it
        groups = {item.nodeid: scope for item, scope in scope_of.items() if scope != item.nodeid}
        written = Path(os.environ[GROUPS_FILE])
        partial = written.with_name(f"{written.name}.{os.getpid()}")
        partial.write_text(json.dumps(groups))
        partial.replace(written)


def pytest_configure(config: pytest.Config) -> None:
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):  # the xdist controller
        handle, name = tempfile.mkstemp(prefix="dsq-test-groups-", suffix=".json")
        os.close(handle)
        os.environ[GROUPS_FILE] = name  # the workers it starts inherit it
        config.add_cleanup(lambda: os.unlink(name))


@pytest.hookimpl(optionalhook=True)  # only xdist defines it
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """xdist's load scheduling, in the collection's order (longest first), with the groups of _schedule.

    (xdist's own `--dist loadgroup` cannot be used: it renames the tests, which pytest 9 no longer allows.)"""
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtures(LoadScopeScheduling):
        groups: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.groups is None:  # read once: the workers wrote it before they reported their collection
                self.groups = json.loads(Path(os.environ[GROUPS_FILE]).read_text() or "{}")
            return self.groups.get(nodeid, nodeid)

    config.option.loadscopereorder = False
    return SharedFixtures(config, log)


class LayerViolation(AssertionError):
    """A test did what its layer excludes."""


_violations: list[LayerViolation] = []


def _violation(layer: str, what: str, instead: str) -> LayerViolation:
    error = LayerViolation(f"a {layer} test {what}: {instead}, or mark the test with its layer")
    _violations.append(error)
    return error


def _refuse(layer: str, what: str, instead: str):
    def refused(*args, **kwargs):
        raise _violation(layer, what, instead)
    return refused


@contextlib.contextmanager
def _confined(layer: str) -> Iterator[None]:
    """Refuse, while a test of ``layer`` runs, what that layer excludes."""
    with pytest.MonkeyPatch.context() as patch, contextlib.ExitStack() as stack:
        if layer != "e2e":
            execute_child = subprocess.Popen._execute_child

            def only_system_commands(self, args, *rest, **kwargs):
                argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
                if os.path.basename(os.fsdecode(argv[0]).split()[0]) not in SYSTEM_COMMANDS:
                    raise _violation(layer, f"started a process ({argv[0]!r})", "request starts_processes")
                return execute_child(self, args, *rest, **kwargs)

            patch.setattr(subprocess.Popen, "_execute_child", only_system_commands)
            started = _refuse(layer, "started a process", "request starts_processes")
            patch.setattr(multiprocessing.util, "spawnv_passfds", started)  # spawn and forkserver
            patch.setattr(os, "fork", started)
        if layer in ("unit", "db") and "ray" in sys.modules:
            ray = sys.modules["ray"]
            refused = _refuse(layer, "used Ray", "request ray_session")
            patch.setattr(ray, "init", refused)
            patch.setattr(ray._private.worker.Worker, "check_connected", refused)
        if layer == "unit":
            refused = _refuse(layer, "opened a database", "use a database fixture or request opens_database")
            patch.setattr(sqlite3, "connect", refused)
            patch.setattr(sqlite3.dbapi2, "connect", refused)
            if "psycopg" in sys.modules:
                patch.setattr(sys.modules["psycopg"], "connect", refused)
            from sqlalchemy import Engine, event
            from sqlalchemy.pool import Pool

            for target, name in ((Engine, "do_connect"), (Pool, "checkout")):  # new and pooled connections
                event.listen(target, name, refused)
                stack.callback(event.remove, target, name, refused)
        yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    _violations.clear()
    with _confined(item.stash.get(_LAYER, "e2e")):
        result = yield
    if _violations:  # raised even if the test caught it
        raise _violations[0]
    return result
