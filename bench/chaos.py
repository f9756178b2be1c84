"""``dsq bench --chaos N``: the same small experiment N times while faults hit it, against one undisturbed run.

A throw-away world: a PostgreSQL server from the pgserver wheel, an artifact folder, and a Ray of two nodes
``ray start``ed here (a head and one worker node, each in its own process group, so that the worker node can be
killed), served by one ``dsq worker`` process. The experiment is two certify jobs of the digits pair (random
weights saved once as files: no training) at two sigmas over a few images. One undisturbed run gives the
reference rows; each disturbed run submits the same two jobs again and makes 1 or 2 faults of these kinds, each
once the run has stored a random number of its images (at least two still to come) and 0-1 s on:

- ``worker``: SIGKILL the ``dsq worker`` process, and start another;
- ``sampler``: SIGKILL a sampler actor's process (Ray starts it again);
- ``node``: SIGKILL the worker node's process group (its raylet and every process on it), and start a new node;
- ``postgres``: stop the server at once (``pg_ctl -m immediate``), and start it again 2 to 6 s later.

A run passes when every job succeeded, each image's row (prediction, radius, both counts) equals the reference's,
and no job holds two rows or two work units of one image. Everything is stopped by its process id or group.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from sqlalchemy import exc

from bench.config import PAIRS
from bench.rayjobs import save_pair
from dsq import jobs
from dsq.db import repo
from dsq.db.session import open_database, session_scope
from dsq.errors import InvalidArgument
from dsq.kinds.certify import CertifySpec
from dsq.settings import Settings
from workers.ports import free_port, ray_node_ports

KINDS = ("worker", "sampler", "node", "postgres")
SIGMAS = (0.25, 0.5)  # the experiment: one certify job per sigma, the same f o D
RAY = str(Path(sys.executable).parent / "ray")
# A killed node is declared dead after about 5 missed health checks of a second; a live but slow one gets 5 x 5 s.
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "5",
           "RAY_health_check_timeout_ms": "5000", "RAY_ADDRESS": ""}
NODES = """
import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
print(sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")))
"""
Log = Callable[[str], None]


@dataclass
class Outcome:
    number: int              # 0: the undisturbed reference run
    faults: list[str] = field(default_factory=list)  # what was done, e.g. "worker@12.3s"
    missed: list[str] = field(default_factory=list)  # faults not made, and why: "sampler (none alive)"
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems


def check_options(runs: int, kinds: tuple[str, ...], per_run: int, images: int) -> None:
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise InvalidArgument(f"--chaos-faults must name some of {', '.join(KINDS)}, got {','.join(kinds) or '(none)'}")
    for name, value in (("--chaos", runs), ("--chaos-per-run", per_run), ("--chaos-images", images)):
        if value < 1:
            raise InvalidArgument(f"{name} must be an integer >= 1, got {value}")


def plan(runs: int, kinds: tuple[str, ...], per_run: int, seed: int) -> list[list[str]]:
    """The fault kinds of each run: the first cycles through ``kinds`` (N >= len(kinds) makes each at least once),
    the others (up to ``per_run`` in all) are drawn at random."""
    rng = random.Random(seed)
    return [[kinds[i % len(kinds)]] + [rng.choice(kinds) for _ in range(rng.randint(0, per_run - 1))]
            for i in range(runs)]


def run(runs: int, *, kinds: tuple[str, ...] = KINDS, per_run: int = 2, images: int = 6, n: int = 5_000,
        seed: int = 0, log: Log = print) -> list[Outcome]:
    """The reference run, then ``runs`` disturbed ones; each run's outcome (the reference first)."""
    check_options(runs, kinds, per_run, images)
    rng = random.Random(seed)
    with World(log) as world:
        specs = world.experiment(images, n)
        reference = world.run_once(specs, [], rng)
        log(line(reference, runs))
        outcomes = [reference]
        if reference.passed:
            for number, faults in enumerate(plan(runs, kinds, per_run, seed), start=1):
                found = world.run_once(specs, faults, rng, reference=reference, number=number)
                log(line(found, runs))
                outcomes.append(found)
    return outcomes


def line(outcome: Outcome, runs: int) -> str:
    what = "undisturbed reference" if outcome.number == 0 else ", ".join(outcome.faults + outcome.missed)
    verdict = "ok" if outcome.passed else "FAILED: " + "; ".join(outcome.problems)
    return f"run {outcome.number}/{runs}: {what}; {outcome.seconds:.1f} s; {verdict}"


def summary(outcomes: list[Outcome]) -> str:
    reference, disturbed = outcomes[0], outcomes[1:]
    if not disturbed:
        return f"chaos: the undisturbed reference run failed ({'; '.join(reference.problems)}); no disturbed run"
    made: dict[str, int] = {}
    for outcome in disturbed:
        for fault in outcome.faults:
            kind = fault.split("@")[0]
            made[kind] = made.get(kind, 0) + 1
    missed = sum(len(o.missed) for o in disturbed)
    mean = sum(o.seconds for o in disturbed) / len(disturbed)
    return (f"chaos: {sum(o.passed for o in disturbed)}/{len(disturbed)} runs passed; mean {mean:.1f} s a run "
            f"(undisturbed {reference.seconds:.1f} s); faults: "
            + ", ".join(f"{kind} {made.get(kind, 0)}" for kind in KINDS)
            + (f"; {missed} not made (no sampler alive, or the jobs had ended)" if missed else ""))


class Postgres:
    """A throw-away PostgreSQL server (the pgserver wheel's binaries, a Unix socket) that can be stopped and
    started again on the same socket, so its URL does not change."""

    def __init__(self, root: Path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pgserver
            from pgserver import _commands

        self._pg_ctl = _commands.pg_ctl
        self.server = pgserver.get_server(root / "pg", cleanup_mode="delete")
        self.url = self.server.get_uri()

    def stop(self) -> None:
        self._pg_ctl(["-m", "immediate", "-w", "stop"], pgdata=self.server.pgdata, user=self.server.system_user)

    def start(self) -> None:
        self.server.ensure_postgres_running()

    def close(self) -> None:
        self.start()  # its cleanup stops a running server, then deletes its folder
        self.server.cleanup()


class World:
    """The throw-away setup of a chaos benchmark, and the faults made to it."""

    def __init__(self, log: Log):
        self.log = log
        self.root = Path(tempfile.mkdtemp(prefix="dsq-chaos-"))  # short: Ray's socket paths have a length limit
        self.processes: dict[str, subprocess.Popen] = {}
        self.postgres: Postgres | None = None
        self.engine = None
        self.reference_rows: list[list[tuple]] = []

    def __enter__(self) -> "World":
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *_) -> None:
        self.close()

    def _start(self) -> None:
        started = time.perf_counter()
        self.postgres = Postgres(self.root)
        self.settings = Settings(database_url=self.postgres.url, home=self.root / "home", autostart=False)
        self.engine = open_database(self.settings.database_url)
        port = free_port()
        self.address = f"127.0.0.1:{port}"
        self.processes["head"] = self._node(["--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                                             f"--temp-dir={self.root / 'ray'}", f"--ray-client-server-port={free_port()}"])
        self._wait_for_nodes(1)
        self.processes["node"] = self._node([f"--address={self.address}", "--num-cpus=1"])
        self._wait_for_nodes(2)
        self.start_worker()
        self.log(f"chaos: PostgreSQL, a Ray head and a worker node (1 CPU each) and a dsq worker in {self.root}, "
                 f"ready in {time.perf_counter() - started:.0f} s")

    def close(self) -> None:
        for name in ("worker", "node", "head"):
            if name in self.processes:  # `ray start --block` of a head often waits out a long grace: nothing is kept
                stop_group(self.processes.pop(name), grace=20 if name == "worker" else 3)
        if self.engine is not None:
            self.engine.dispose()
        if self.postgres is not None:
            self.postgres.close()
        subprocess.run(["rm", "-rf", str(self.root)], check=False)

    # ------------------------------------------------------------------ processes
    def _node(self, args: list[str]) -> subprocess.Popen:
        log = open(self.root / f"node-{len(list(self.root.glob('node-*.log')))}.log", "w")
        return subprocess.Popen(
            [RAY, "start", "--block", "--node-ip-address=127.0.0.1", "--memory=2000000000",
             "--object-store-memory=100000000", "--disable-usage-stats", *ray_node_ports(), *args],
            env=os.environ | RAY_ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root)

    def _wait_for_nodes(self, count: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout  # generous: a busy machine starts a node in tens of seconds
        while True:
            try:
                done = subprocess.run([sys.executable, "-c", NODES, self.address], env=os.environ | RAY_ENV,
                                      capture_output=True, text=True, timeout=120)
                if done.returncode == 0 and int(done.stdout.split()[-1]) >= count:
                    return
            except (subprocess.TimeoutExpired, ValueError, IndexError):
                pass
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.processes.values()):
                logs = "\n".join(p.read_text()[-1500:] for p in sorted(self.root.glob("node-*.log")))
                raise RuntimeError(f"the chaos benchmark's Ray did not get {count} node(s) up:\n{logs}")
            time.sleep(1)

    def start_worker(self) -> None:
        env = os.environ | {"RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": self.address,
                            "DSQ_HOME": str(self.settings.home), "DSQ_DATABASE_URL": self.settings.database_url,
                            "DSQ_WORKER_AUTOSTART": "0", "DSQ_STALE_SECONDS": "15", "DSQ_DB_GRACE_SECONDS": "120"}
        log = open(self.root / f"worker-{len(list(self.root.glob('worker-*.log')))}.log", "w")
        self.processes["worker"] = subprocess.Popen([sys.executable, "-m", "cli", "worker"], env=env, stdout=log,
                                                    stderr=subprocess.STDOUT, start_new_session=True,
                                                    cwd=Path(__file__).resolve().parents[1])

    def samplers(self) -> list[int]:
        """The pids of the sampler actors' processes on this world's nodes: children of a raylet of one of its
        nodes' process groups (a Ray worker process is a session of its own; other Rays may run on this machine)."""
        return [pid for pid, argv in self.ray_workers(("head", "node")).items() if argv.startswith(b"ray::SamplerActor")]

    def ray_workers(self, nodes: tuple[str, ...]) -> dict[int, bytes]:
        """pid -> argv[0] of the processes that the raylets of these nodes (by their process groups) started."""
        groups = {self.processes[name].pid for name in nodes if name in self.processes}
        table = processes()
        raylets = {pid for pid, (_, group, argv) in table.items() if group in groups and argv.endswith(b"/raylet")}
        return {pid: argv for pid, (parent, _, argv) in table.items() if parent in raylets}

    # ------------------------------------------------------------------ the experiment and its runs
    def experiment(self, images: int, n: int) -> list[CertifySpec]:
        folder = self.root / "models"
        folder.mkdir()
        classifier, denoiser = save_pair(PAIRS["digits"], 0, folder)
        return [CertifySpec(dataset="digits", classifier=classifier, denoiser=denoiser, sigma=sigma, n0=20, n=n,
                            batch_size=1000, max_images=images, workers=1, previews=0, seed=7) for sigma in SIGMAS]

    def run_once(self, specs: list[CertifySpec], faults: list[str], rng: random.Random, *,
                 reference: Outcome | None = None, number: int = 0) -> Outcome:
        outcome = Outcome(number)
        with session_scope(self.engine) as session:
            ids = [jobs.submit(session, spec, self.settings, experiment=f"chaos-{number}").id for spec in specs]
        started = time.perf_counter()
        deadline = started + max(900.0, 20 * (reference.seconds if reference else 0.0))
        total = sum(spec.max_images for spec in specs)
        # each fault once the run has stored a random number of images (0 .. all but two), then 0-1 s on: mid-run
        # whatever the run's speed (a warm run is faster than the reference, which started the actors), with two
        # images still to come so that a fast run does not end before its last fault
        points = sorted(rng.randrange(max(1, total - 1)) for _ in faults)
        for kind, point in zip(rng.sample(faults, len(faults)), points):
            self._supervise(lambda done, final: final or done >= point, ids, deadline)
            time.sleep(rng.uniform(0, 1))
            done, final = self._state(ids)
            if final:
                outcome.missed.append(f"{kind} (after the jobs ended)")
            else:
                self._fault(kind, f"{time.perf_counter() - started:.1f}s ({max(done, 0)}/{total} images",
                            rng, outcome, ids)
        self._supervise(lambda done, final: final, ids, deadline)
        outcome.seconds = time.perf_counter() - started
        with session_scope(self.engine) as session:
            rows, outcome.problems = check(session, ids, self.reference_rows if reference else None)
        if reference is None:
            self.reference_rows = rows
        return outcome

    def _fault(self, kind: str, at: str, rng: random.Random, outcome: Outcome, ids: list[int]) -> None:
        if kind == "worker":
            stop_group(self.processes.pop("worker"), signal.SIGKILL)
            self.start_worker()
        elif kind == "sampler":
            deadline = time.monotonic() + 30  # between two jobs none may be alive for a moment
            while not (victims := self.samplers()) and time.monotonic() < deadline and not self._state(ids)[1]:
                time.sleep(0.2)
            if not victims:
                outcome.missed.append(f"{kind} (none alive)")
                return
            with contextlib.suppress(ProcessLookupError):
                os.kill(rng.choice(victims), signal.SIGKILL)
        elif kind == "node":  # the node's group, and the worker processes its raylet started (sessions of their own)
            workers = self.ray_workers(("node",))
            stop_group(self.processes.pop("node"), signal.SIGKILL)
            for pid in workers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.processes["node"] = self._node([f"--address={self.address}", "--num-cpus=1"])
        else:
            self.postgres.stop()
            down = rng.uniform(2, 6)
            time.sleep(down)
            self.postgres.start()
            outcome.faults.append(f"postgres@{at}, down {down:.1f} s)")
            return
        outcome.faults.append(f"{kind}@{at})")

    def _supervise(self, until: Callable[[int, bool], bool], ids: list[int], deadline: float) -> None:
        """Wait until ``until(images stored, every job final)`` holds or ``deadline`` passed, starting a new ``dsq
        worker`` if the one running has exited (a worker stops once the database has been gone for its grace)."""
        while True:
            worker = self.processes.get("worker")
            if worker is not None and worker.poll() is not None:
                self.log(f"  the dsq worker exited ({worker.returncode}); starting another")
                self.start_worker()
            if until(*self._state(ids)) or time.perf_counter() > deadline:
                return
            time.sleep(0.5)

    def _state(self, ids: list[int]) -> tuple[int, bool]:
        """(images stored, every job final) of these jobs; (-1, False) while the database is away."""
        try:
            with session_scope(self.engine) as session:
                found = [repo.get_job(session, job_id) for job_id in ids]
        except exc.DBAPIError:
            return -1, False
        return sum(job.progress_done for job in found), all(job.finished for job in found)


def check(session, ids: list[int], reference: list[list[tuple]] | None) -> tuple[list[list[tuple]], list[str]]:
    """Each job's rows (image, prediction, radius, both counts), and what is wrong: a job that did not succeed, two
    rows or work units of one image, rows unlike ``reference``'s (the undisturbed run's, job by job)."""
    problems, rows = [], []
    for number, job_id in enumerate(ids):
        job = repo.get_job(session, job_id)
        if job.status != "succeeded":
            problems.append(f"job {job_id} {job.status}" + (f" ({job.error})" if job.error else ""))
        found = repo.results_for_job(session, job_id)
        indexes = [r.image_index for r in found]
        units = [u.key for u in repo.work_units(session, job_id)]
        if len(set(indexes)) != len(indexes) or len(set(units)) != len(units):
            problems.append(f"job {job_id} has two rows of one image")
        rows.append([(r.image_index, r.prediction, r.radius, r.counts_selection, r.counts_estimation) for r in found])
        if reference is not None and rows[-1] != reference[number]:
            problems.append(f"job {job_id}: {len(rows[-1])} rows, unlike the undisturbed run's {len(reference[number])}"
                            if len(rows[-1]) != len(reference[number]) else
                            f"job {job_id}: per-image counts differ from the undisturbed run's")
    return rows, problems


def stop_group(process: subprocess.Popen, how: int = signal.SIGTERM, grace: float = 20) -> None:
    """Stop a process started in its own session and everything in its group: ``how``, then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, how)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def processes() -> dict[int, tuple[int, int, bytes]]:
    """Every process of this machine: pid -> (parent pid, process group, argv[0]), from /proc."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
            argv = (entry / "cmdline").read_bytes().split(b"\0")[0]
        except OSError:
            continue
        found[int(entry.name)] = (int(fields[1]), int(fields[2]), argv)
    return found
