"""Fault injection on a real multi-node Ray (a CPU-less head and two worker nodes, each `ray start`ed on its own
ports and in its own process group) with PostgreSQL as the database: kill a sampler, a worker node's raylet, the
job runner; run jobs side by side; hammer the databases with concurrent writers."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import create_engine, make_url, text

from dsq import jobqueue, references, smoothing
from dsq.kinds import certify
from dsq.db import repo
from dsq.db.models import Worker
from dsq.db.session import open_database, session_scope
from dsq.settings import Settings
from tests.conftest import NARROW, free_port, ray_node_ports, slow

RAY = str(Path(sys.executable).parent / "ray")
# A killed raylet refuses the health check at once, so it is declared dead after about threshold x period; a live
# node that is slow to answer on a busy machine is given threshold x timeout before it is (wrongly) declared dead.
ENV = os.environ | {"RAY_AUTH_MODE": "disabled", "RAY_health_check_period_ms": "1000",
                    "RAY_health_check_failure_threshold": "5", "RAY_health_check_timeout_ms": "5000"}
# The jobs certify the sleeping classifier (tests/slownet.py): 21 batches an image, shared by 2 samplers, take a
# fraction of a second and almost no CPU. A fault test holds its job on a file (``held_after_one``) while it
# injects the fault, so the fault lands mid-job however busy the machine is.
IMAGES = 24


def certify_args(hold: Path | None = None) -> list[str]:
    return ["submit", "certify", "--dataset", "digits", *slow(hold=hold), "--sigma", "0.25", "--n0", "20",
            "--n", "20000", "--batch-size", "1000", "--max-images", str(IMAGES), "--workers", "2", "--seed", "7"]


CERTIFY = certify_args()


def start_node(args, temp, env=None) -> subprocess.Popen:
    """A `ray start`ed node (``env``: more of its environment, as Ray's processes on it see it)."""
    log = open(Path(temp) / f"node-{len(list(Path(temp).glob('node-*.log')))}.log", "w")
    return subprocess.Popen(
        [RAY, "start", "--block", "--node-ip-address=127.0.0.1", "--memory=3000000000",
         "--object-store-memory=150000000", "--disable-usage-stats", "--include-log-monitor=false",
         *ray_node_ports(), *args],
        env=ENV | (env or {}), stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=temp)


def node_logs(temp) -> str:
    return "\n".join(f"{p.name}: {p.read_text()[-1500:]}" for p in sorted(Path(temp).glob("node-*.log")))


TEMPS: dict[str, Path] = {}  # a cluster's address -> its Ray temp folder (its logs, for a failure's message)


def ray_errors(address) -> str:
    """What the cluster's Ray processes said of errors and deaths (tracebacks in worker logs; raylets' kills)."""
    logs = Path(TEMPS.get(address, "/nonexistent")) / "session_latest" / "logs"
    said = []
    for path in sorted(logs.glob("*")):
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        lines = [line for line in text.splitlines()
                 if any(word in line for word in ("Traceback", "Error", "error:", "Killing", "memory", "died"))]
        if lines:
            said.append(f"{path.name}: " + " | ".join(lines[-8:])[-2000:])
    return "\n".join(said)[-12000:] or "(no errors in the Ray logs)"


def stop(*processes: subprocess.Popen) -> None:
    """Stop process groups: all asked at once, then each waited for, and killed after 5 s (`ray start --block` of a
    head often waits out any grace, and nothing of these nodes is kept)."""
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        try:  # the group's leftovers (a node's workers after its raylet was killed), or a node that did not stop
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


INSPECT = """
import json, sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
from ray._private.state import state
actors = [{"cls": a["ActorClassName"], "pid": a["Pid"], "node": a["Address"]["NodeID"], "name": a["Name"]}
          for a in state.actor_table(None).values() if a["State"] == "ALIVE"]
nodes = [{"id": n["NodeID"], "port": n["NodeManagerPort"], "cpus": n["Resources"].get("CPU", 0)}
         for n in ray.nodes() if n["Alive"]]
print("DSQ-STATE " + json.dumps({"actors": actors, "nodes": nodes}))
"""


def inspect(address, timeout=120) -> dict:
    out = subprocess.run([sys.executable, "-c", INSPECT, address], env=ENV, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr
    [line] = [line for line in out.stdout.splitlines() if line.startswith("DSQ-STATE ")]
    return json.loads(line.removeprefix("DSQ-STATE "))


def start_head(temp, env=None) -> tuple[subprocess.Popen, str]:
    """A CPU-less head `ray start`ed in ``temp``, and its address once it answers. `ray start` gives its raylet 30 s,
    which a busy machine can exceed: a head that gave up is started again, within a generous deadline."""
    deadline = time.monotonic() + 300
    while True:
        port = free_port()
        head = start_node(["--head", f"--port={port}", "--num-cpus=0", "--include-dashboard=false",
                           f"--temp-dir={temp}", f"--ray-client-server-port={free_port()}"], temp, env)
        address = f"127.0.0.1:{port}"
        while head.poll() is None:
            if subprocess.run([sys.executable, "-c", CHECK, address], env=ENV, capture_output=True).returncode == 0:
                return head, address
            assert time.monotonic() < deadline, f"ray head did not start: {node_logs(temp)}"
            time.sleep(1)
        stop(head)
        assert time.monotonic() < deadline, f"ray head did not start: {node_logs(temp)}"


@pytest.fixture(scope="module")
def cluster(starts_processes):
    temp = Path(tempfile.mkdtemp(prefix="dsq-faults-"))  # short: Ray's socket paths have a length limit
    head, address = start_head(temp)
    workers = []
    TEMPS[address] = temp
    try:
        for nodes in (2, 3):  # one at a time: two nodes starting at once can starve each other on 2 cores
            workers.append(join_node(address, temp, "--num-cpus=1", lambda found: len(found) >= nodes)[0])
            assert head.poll() is None, f"the ray head died: {node_logs(temp)}"
        yield address, workers
    finally:
        stop(*workers, head)
        shutil.rmtree(temp, ignore_errors=True)


def join_node(address, temp, cpus: str, ready, env=None) -> tuple[subprocess.Popen, list]:
    """A node `ray start`ed into the cluster, and the live nodes once ``ready(nodes)`` holds. `ray start` gives its
    raylet 30 s, which a busy machine can exceed: a node that gave up is started again, within a generous deadline."""
    node = start_node([f"--address={address}", cpus], temp, env)
    try:
        deadline = time.monotonic() + 300
        while not ready(found := joined(address)):
            assert time.monotonic() < deadline, f"a worker node did not join: {node_logs(temp)}"
            if node.poll() is not None:
                stop(node)
                node = start_node([f"--address={address}", cpus], temp, env)
            time.sleep(1)
    except BaseException:
        stop(node)
        raise
    return node, found


def joined(address) -> list:
    """The live nodes, or none while the cluster is too busy to answer (the caller waits on)."""
    try:
        return inspect(address, timeout=60)["nodes"]
    except (AssertionError, subprocess.TimeoutExpired):
        return []


CHECK = "import sys; from workers.resources import check_reachable; check_reachable(sys.argv[1])"


@pytest.fixture(scope="module")
def world(cluster, postgres_server, tmp_path_factory):
    """A PostgreSQL database with an undisturbed certify run (job 1)."""
    address, _ = cluster
    name = f"dsq_faults_{os.getpid()}"
    admin = create_engine(make_url(f"{postgres_server}/postgres").set(drivername="postgresql+psycopg"),
                          isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    home = tmp_path_factory.mktemp("faults-home")
    env = {"DSQ_HOME": str(home), "DSQ_DATABASE_URL": f"{postgres_server}/{name}", "RAY_ADDRESS": address}
    engine = open_database(env["DSQ_DATABASE_URL"])
    try:
        reference = submit(env, *CERTIFY)
        assert wait_for(engine, reference, ("succeeded", "failed")) == "succeeded", logs(engine, reference)
        yield env, engine, rows(engine, reference)
    finally:
        engine.dispose()
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def dsq(env, *args, timeout=900):  # deadlines against hangs, generous for a busy machine
    return subprocess.run([sys.executable, "-m", "cli", *map(str, args)], env=ENV | env, capture_output=True,
                          text=True, timeout=timeout)


def submit(env, *args) -> int:
    out = dsq(env, *args)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


def job_of(engine, job_id):
    with session_scope(engine) as session:
        return repo.get_job(session, job_id)


def wait_for(engine, job_id, wanted, *, done=0, timeout=600) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = job_of(engine, job_id)
        if job.status in wanted and job.progress_done >= done:
            return job.status
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} not {wanted} within {timeout} s: {logs(engine, job_id)}")


def logs(engine, job_id):
    with session_scope(engine) as session:
        return [line.message for line in repo.logs_for_job(session, job_id)]


def rows(engine, job_id):
    with session_scope(engine) as session:
        return [(r.image_index, r.prediction, r.radius, r.counts_selection, r.counts_estimation)
                for r in repo.results_for_job(session, job_id)]


def assert_same_as_undisturbed(engine, job_id, reference):
    found = rows(engine, job_id)
    assert [r[0] for r in found] == sorted({r[0] for r in found})  # no duplicated rows
    assert found == reference and len(found) == IMAGES  # no missing rows, identical radii
    with session_scope(engine) as session:
        units = repo.work_units(session, job_id)
        assert sorted(u.key for u in units) == sorted({u.key for u in units}) and len(units) == IMAGES


def raylet_pid(workers, port) -> int:
    """The raylet of the worker node with this node-manager port (found in /proc, by process group)."""
    groups = {w.pid for w in workers if w.poll() is None}
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if (entry.name.isdigit() and argv[0].endswith(b"/raylet") and os.getpgid(int(entry.name)) in groups
                    and f"--node_manager_port={port}".encode() in argv):
                return int(entry.name)
        except (OSError, IndexError):
            continue
    raise AssertionError(f"no raylet with node manager port {port}")


def actors(address, cls, *, at_least=1, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [a for a in inspect(address)["actors"] if a["cls"] == cls]
        if len(found) >= at_least:
            return found
        time.sleep(0.5)
    raise AssertionError(f"no live {cls}: {ray_errors(address)}")


def registered_workers(engine) -> list:
    with session_scope(engine) as session:
        return [(w.name, w.pid, str(w.started_at), str(w.heartbeat_at), str(w.stopped_at), w.actor_id)
                for w in session.query(Worker)]


def sampler_node_without_runner(address, engine, job_id, timeout=180) -> dict:
    """A worker node that hosts a sampler of the running job but not the queue worker."""
    deadline = time.monotonic() + timeout
    while True:
        state = inspect(address)
        samplers = {a["node"] for a in state["actors"] if a["cls"] == "SamplerActor"}
        runners = {a["node"] for a in state["actors"] if a["cls"] == "WorkerActor"}
        found = [n for n in state["nodes"] if n["id"] in samplers - runners and n["cpus"] > 0]
        if len(samplers) >= 1 and runners and found:
            return found[0]
        assert time.monotonic() < deadline, (
            f"no node with a sampler and without the worker: {state}\njob {job_id}: {job_of(engine, job_id).status}, "
            f"{logs(engine, job_id)}\nworkers: {registered_workers(engine)}\n{ray_errors(address)}")
        time.sleep(0.5)


def held(tmp_path) -> Path:
    """A hold file (tests/slownet.py), there from the start: a job submitted with it waits at its first batch."""
    hold = tmp_path / "hold"
    hold.touch()
    return hold


def held_after_one(engine, job_id, hold: Path) -> None:
    """Let a held job store an image, then hold it again: the fault that comes next lands mid-job."""
    hold.unlink()
    wait_for(engine, job_id, ("running",), done=1)
    hold.touch()


def test_killing_a_sampler_process_mid_job_changes_nothing(cluster, world, tmp_path):
    address, _ = cluster
    env, engine, reference = world
    job_id = submit(env, *certify_args(hold := held(tmp_path)))
    victim = actors(address, "SamplerActor", at_least=2)[0]
    held_after_one(engine, job_id, hold)
    os.kill(victim["pid"], signal.SIGKILL)
    assert job_of(engine, job_id).progress_done < IMAGES  # it was killed mid-job
    hold.unlink()
    assert wait_for(engine, job_id, ("succeeded", "failed")) == "succeeded", logs(engine, job_id)
    assert_same_as_undisturbed(engine, job_id, reference)


def test_losing_a_worker_node_mid_job_changes_nothing(cluster, world, tmp_path):
    address, workers = cluster
    env, engine, reference = world
    # Samplers kept from an earlier job stay where they were (one Ray restarted after a kill may share the worker's
    # node with the other): wait until the idle worker has ended them, so that this job's are spread afresh.
    deadline = time.monotonic() + 180
    while any(a["cls"] == "SamplerActor" for a in inspect(address)["actors"]):
        assert time.monotonic() < deadline, f"samplers of an earlier job still live: {inspect(address)}"
        time.sleep(1)
    job_id = submit(env, *certify_args(hold := held(tmp_path)))
    victim_node = sampler_node_without_runner(address, engine, job_id)
    pid = raylet_pid(workers, victim_node["port"])
    held_after_one(engine, job_id, hold)
    os.kill(pid, signal.SIGKILL)
    assert job_of(engine, job_id).progress_done < IMAGES
    hold.unlink()
    assert wait_for(engine, job_id, ("succeeded", "failed")) == "succeeded", logs(engine, job_id)
    assert_same_as_undisturbed(engine, job_id, reference)
    deadline = time.monotonic() + 120  # Ray declares the node dead after its missed health checks
    while len(inspect(address)["nodes"]) != 2:
        assert time.monotonic() < deadline, "the killed node is still alive"
        time.sleep(1)


def test_killing_the_queue_worker_mid_job_resumes_it(cluster, world, tmp_path):
    address, _ = cluster
    env, engine, reference = world
    job_id = submit(env, *certify_args(hold := held(tmp_path)))
    [runner] = actors(address, "WorkerActor")
    held_after_one(engine, job_id, hold)
    os.kill(runner["pid"], signal.SIGKILL)
    assert job_of(engine, job_id).progress_done < IMAGES
    hold.unlink()
    assert wait_for(engine, job_id, ("succeeded", "failed")) == "succeeded", logs(engine, job_id)
    assert job_of(engine, job_id).attempts == 2  # Ray restarted the worker, which took its job back
    assert_same_as_undisturbed(engine, job_id, reference)


def test_the_job_of_a_worker_whose_ray_node_died_runs_again_at_once(cluster, tmp_path):
    """A worker that ran on a node now dead (its raylet killed): a worker of the same cluster queues its job again
    as soon as Ray reports the node dead, well before the stale heartbeat limit (one hour here)."""
    address, _ = cluster
    temp = Path(tempfile.mkdtemp(prefix="dsq-node-"))
    before = {node["id"] for node in inspect(address)["nodes"]}
    env = {"DSQ_HOME": str(tmp_path), "DSQ_DATABASE_URL": f"sqlite:///{tmp_path / 'dsq.db'}", "RAY_ADDRESS": address,
           "DSQ_WORKER_AUTOSTART": "0", "DSQ_STALE_SECONDS": "3600"}
    node = engine = None
    try:  # the dead worker's node, besides the others
        node, found = join_node(address, temp, "--num-cpus=0", lambda nodes: {n["id"] for n in nodes} - before)
        [victim] = [n for n in found if n["id"] not in before]
        job_id = submit(env, "submit", "train", "--dataset", "digits", "--target", "classifier", *NARROW,
                        "--objective", "standard", "--sigma", "0", "--epochs", "1")
        engine = open_database(env["DSQ_DATABASE_URL"])
        with session_scope(engine) as session:  # a worker process on that node, as it registers and claims
            jobqueue.register_worker(session, name="on-the-lost-node", host="another-machine", pid=1, address=address,
                                     max_jobs=0, node_id=victim["id"])
            assert jobqueue.take(session, job_id, "on-the-lost-node") is not None
        os.kill(raylet_pid([node], victim["port"]), signal.SIGKILL)
        deadline = time.monotonic() + 120  # Ray declares the node dead after its missed health checks
        while victim["id"] in {n["id"] for n in inspect(address)["nodes"]}:
            assert time.monotonic() < deadline, "the killed node is still alive"
            time.sleep(0.5)
        out = dsq(env, "worker", "--drain")
        assert out.returncode == 0, out.stdout + out.stderr
        assert job_of(engine, job_id).status == "succeeded", logs(engine, job_id)
        [lost, ran] = attempts_of(engine, job_id)
        assert (lost.worker, lost.outcome) == ("on-the-lost-node", "died")
        assert f"its Ray node {victim['id'][:12]} is dead" in lost.error and ran.outcome == "succeeded"
        with session_scope(engine) as session:  # the worker that took it over recorded its own node
            [drained] = [w for w in session.query(Worker) if w.name != "on-the-lost-node"]
            assert drained.node_id in before and drained.actor_id is None
        # taken over at the new worker's first look (as it starts), not after the stale limit
        assert (lost.ended_at - drained.started_at).total_seconds() < 10
    finally:
        if engine is not None:
            engine.dispose()
        if node is not None:
            stop(node)
        shutil.rmtree(temp, ignore_errors=True)


def attempts_of(engine, job_id):
    with session_scope(engine) as session:
        found = jobqueue.attempts(session, job_id)
        session.expunge_all()
        return found


def test_two_certifications_and_a_training_at_once(cluster, world):
    env, engine, reference = world
    started = [submit(env, *CERTIFY), submit(env, *CERTIFY[:-2], "--seed", "7", "--workers", "1"),
               submit(env, "submit", "train", "--dataset", "digits", "--target", "denoiser", "--arch", "dncnn",
                      "--objective", "mse", "--sigma", "0.25", "--epochs", "1", "--arch-kwargs",
                      '{"depth": 3, "width": 8}')]
    for job_id in started:
        assert wait_for(engine, job_id, ("succeeded", "failed")) == "succeeded", logs(engine, job_id)
    for job_id in started[:2]:
        assert_same_as_undisturbed(engine, job_id, reference)
    with session_scope(engine) as session:
        path = references.resolve(session, f"job:{started[2]}", Settings.from_env(env))  # fetched, hash-verified
    from dsq import checkpoints

    assert checkpoints.load_checkpoint(path)[1]["kind"] == "denoiser"


def test_many_concurrent_writers_lose_nothing(db_url):
    url = db_url
    engine = open_database(url)
    with session_scope(engine) as session:
        job_id = repo.create_job(session, kind="certify", spec={}, seed=0, total=40).id
    cert = smoothing.certify_counts([0, 5], [1, 99], alpha=0.001, sigma=0.25)
    writers, per_writer = 8, 20

    def write(writer: int) -> None:
        own = open_database(url)
        try:
            for step in range(per_writer):
                image = (writer * 7 + step) % 40  # writers overlap on images: idempotent upserts
                with session_scope(own) as session:
                    certify.record_certificate(session, job_id, image, 1, cert, seconds=0.1, worker=f"w{writer}",
                                            device="cpu")
                    repo.add_log(session, job_id, f"w{writer} s{step}")
                    repo.heartbeat(session, job_id)
        finally:
            own.dispose()

    with ThreadPoolExecutor(writers) as pool:
        for future in [pool.submit(write, w) for w in range(writers)]:
            future.result()  # re-raises "database is locked" or a lost transaction, if any
    with session_scope(engine) as session:
        assert sorted(r.image_index for r in repo.results_for_job(session, job_id)) == list(range(40))
        assert len(repo.work_units(session, job_id, "done")) == 40
        messages = [line.message for line in repo.logs_for_job(session, job_id)]
        assert len(messages) == len(set(messages)) == writers * per_writer  # no update lost
    engine.dispose()


CLUSTER_CLI = ("import sys; from cli.main import app; from cli import cluster\n"
               "if not any(c.name == 'cluster' for c in app.registered_commands): cluster.register(app)\n"
               "app(prog_name='dsq')")


def test_dsq_cluster_shows_nodes_actors_and_jobs(cluster, world, tmp_path):
    address, _ = cluster
    env, engine, _ = world
    out = subprocess.run([sys.executable, "-c", CLUSTER_CLI, "cluster"], env=ENV | env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "(head)" in out.stdout and "/1 used" in out.stdout and "queued and running jobs" in out.stdout
    local = subprocess.run([sys.executable, "-c", CLUSTER_CLI, "cluster"], capture_output=True, text=True,
                           env={k: v for k, v in (ENV | {"DSQ_HOME": str(tmp_path)}).items() if k != "RAY_ADDRESS"})
    assert local.returncode == 2 and local.stderr.startswith("error: no cluster configured")


REQUESTED = """
import json, sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
from ray.autoscaler.v2.utils import is_autoscaler_v2
from ray.experimental.internal_kv import _internal_kv_get
raw = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
print("DSQ-REQUEST " + json.dumps({"v2": is_autoscaler_v2(), "bundles": json.loads(raw) if raw else None}))
"""


def requested(address):
    out = subprocess.run([sys.executable, "-c", REQUESTED, address], env=ENV, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    [line] = [line for line in out.stdout.splitlines() if line.startswith("DSQ-REQUEST ")]
    found = json.loads(line.removeprefix("DSQ-REQUEST "))
    assert not found["v2"]  # a local cluster runs no autoscaler v2: the request sits in the GCS key-value store
    return found["bundles"]


def test_a_worker_asks_the_autoscaler_for_what_queued_jobs_need_within_its_cap(cluster, tmp_path):
    """Two 1-CPU nodes; three certify jobs of 2 sampler CPUs each wait for a training; cap CPU=5."""
    address, _ = cluster
    env = {"DSQ_HOME": str(tmp_path), "DSQ_DATABASE_URL": f"sqlite:///{tmp_path / 'dsq.db'}", "RAY_ADDRESS": address,
           "DSQ_WORKER_AUTOSTART": "0"}
    assert submit(env, "submit", "train", "--dataset", "digits", "--target", "classifier", *NARROW,
                  "--objective", "standard", "--sigma", "0", "--epochs", "3") == 1
    for seed in range(3):
        submit(env, "submit", "certify", "--dataset", "digits", "--classifier", "job:1", "--sigma", "0.25",
               "--n0", "20", "--n", "4000", "--batch-size", "1000", "--max-images", "3", "--workers", "2",
               "--seed", str(seed))
    worker = subprocess.Popen([sys.executable, "-m", "cli", "worker", "--drain", "--max-request", "CPU=5"],
                              env=ENV | env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
    seen = []
    try:
        deadline = time.monotonic() + 300
        while worker.poll() is None and time.monotonic() < deadline:
            bundles = requested(address)
            if bundles and bundles not in seen:
                seen.append(bundles)
        out = worker.communicate(timeout=60)[0]
    finally:
        stop(worker)
    assert worker.returncode == 0, out
    # while f trains, the certify jobs wait for it: only the running training is asked for;
    # then one certify job runs (2 CPUs) and the next fits (4), the third would pass the cap (6)
    assert [{"CPU": 1.0}] in seen and [{"CPU": 2.0}, {"CPU": 2.0}] in seen, (seen, out)
    assert all(sum(b["CPU"] for b in bundles) <= 5 for bundles in seen)
    assert requested(address) == []  # an empty queue lets the cluster shrink
    assert "asked the autoscaler for 2 bundle(s): CPU 4" in out
