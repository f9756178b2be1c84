"""A worker with a --max-request cap against Ray's own autoscaler, on a fake multi-node cluster: GPU jobs make it
launch a gpu node, they run there, and the cluster shrinks back once the queue is empty.

Ray's fake multi-node provider (``provider: fake_multinode``) launches a node as local raylet processes with the
resources of its node type; the GPU is Ray's resource only, so the worker runs its GPU actors' torch on the CPU
(``DSQ_GPU_DEVICE=cpu``; the result rows say so). ``ray.cluster_utils.AutoscalingCluster`` is not used: its
``start`` and ``shutdown`` run ``ray stop --force`` (every Ray of the machine), and its config template
(``fake_multi_node/example.yaml``) is not in Ray's wheel. The head is `ray start`ed here with the same settings.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from dsq.db import repo
from dsq.db.session import open_database, session_scope
from tests.conftest import NARROW, _stop_group, free_port, ray_node_ports

pytestmark = pytest.mark.e2e

RAY = str(Path(sys.executable).parent / "ray")
ENV = os.environ | {"RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": ""}
OBJECT_STORE = 100_000_000
# The node types of ray_cluster.yaml, small: a CPU head (the queue worker), gpu nodes with one (fake) GPU, api nodes.
NODE_TYPES = {
    "gpu": {"resources": {"CPU": 1, "GPU": 1, "object_store_memory": OBJECT_STORE}, "node_config": {},
            "min_workers": 0, "max_workers": 1},
    "api": {"resources": {"CPU": 1, "dsq_api": 8, "object_store_memory": OBJECT_STORE}, "node_config": {},
            "min_workers": 0, "max_workers": 1},
}
IDLE_MINUTES = 0.1  # a node idle this long is removed
CAP = "CPU=2,GPU=1,dsq_api=8"


def autoscaling_config(gcs_address: str) -> dict:
    empty = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
             "head_start_ray_commands", "worker_start_ray_commands", "rsync_exclude", "rsync_filter",
             "cluster_synced_files")
    return {"cluster_name": "dsq-fake", "max_workers": 2, "upscaling_speed": 1.0,
            "idle_timeout_minutes": IDLE_MINUTES,
            # no setup to run on a fake node (its updater would fail to tag it), no launch config to compare; the
            # nodes share an ip, so the autoscaler tells them apart (idle or not) by node id
            "provider": {"type": "fake_multinode", "gcs_address": gcs_address, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "use_node_id_as_ip": True},
            "auth": {"ssh_user": "nobody"}, "docker": {}, "file_mounts": {}, "file_mounts_sync_continuously": False,
            "head_node_type": "ray.head.default", **{key: [] for key in empty},
            "available_node_types": {**NODE_TYPES, "ray.head.default": {"resources": {"CPU": 1}, "node_config": {},
                                                                         "max_workers": 0}}}


# What the cluster looks like, twice a second, as JSON lines: one process for the whole test.
WATCH = """
import json, sys, time, ray
while True:  # the head may still be starting (minutes on a busy machine): ray.init gives up sooner
    try:
        ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
        break
    except Exception as error:
        print(f"not yet: {error}", file=sys.stderr, flush=True)
        time.sleep(2)
from ray._private.state import state
while True:
    nodes = [{"id": n["NodeID"], "alive": n["Alive"], "resources": n["Resources"]} for n in ray.nodes()]
    actors = [{"cls": a["ActorClassName"], "node": a["Address"]["NodeID"], "state": a["State"]}
              for a in state.actor_table(None).values()]
    print("DSQ-WATCH " + json.dumps({"t": time.time(), "nodes": nodes, "actors": actors}), flush=True)
    time.sleep(0.5)
"""


class Watch:
    def __init__(self, address: str, temp: Path):
        self.temp = temp
        self.process = subprocess.Popen([sys.executable, "-c", WATCH, address], env=ENV, stdout=subprocess.PIPE,
                                        stderr=open(temp / "watch.log", "w"), text=True, start_new_session=True)
        self.seen: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            if line.startswith("DSQ-WATCH "):
                self.seen.append(json.loads(line.removeprefix("DSQ-WATCH ")))

    def until(self, what, timeout: float, message: str) -> float:
        """The time (seconds since the epoch) of the first view at which ``what(view)`` holds."""
        deadline, looked = time.monotonic() + timeout, 0
        while time.monotonic() < deadline:
            views = self.seen[looked:]
            looked += len(views)
            for view in views:
                if what(view):
                    return view["t"]
            time.sleep(0.2)
        logs = "\n".join(f"--- {name} (end):\n{tail(self.temp / name)}" for name in ("watch.log", "head.log"))
        raise AssertionError(f"{message} within {timeout} s; last view: {self.seen[-1:]}; watcher "
                             f"{'running' if self.process.poll() is None else 'ended'}\n{logs}")

    def gpu_nodes(self) -> set[str]:
        return {n["id"] for view in self.seen for n in view["nodes"] if n["alive"] and n["resources"].get("GPU")}


def tail(path: Path, lines: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(none)"


def head_up(head: subprocess.Popen, log: Path, timeout: float) -> None:
    """Wait until `ray start --head --block` says its node runs (minutes on a busy machine)."""
    deadline = time.monotonic() + timeout
    while "Ray runtime started" not in log.read_text(errors="replace"):
        assert head.poll() is None, f"`ray start --head` ended ({head.returncode}):\n{tail(log)}"
        assert time.monotonic() < deadline, f"the head did not start within {timeout} s:\n{tail(log)}"
        time.sleep(0.5)


def alive_gpu(view) -> bool:
    return any(n["alive"] and n["resources"].get("GPU") for n in view["nodes"])


def stop_leftovers(temp: Path) -> None:
    """The fake nodes' processes (started by the autoscaler under this cluster's session folder), if any is left."""
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(temp).encode() in (entry / "cmdline").read_bytes():
                os.kill(int(entry.name), signal.SIGKILL)
        except OSError:
            continue


def dsq(env, *args, timeout=300):
    out = subprocess.run([sys.executable, "-m", "cli", *map(str, args)], env=ENV | env, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def test_gpu_jobs_grow_the_cluster_with_a_gpu_node_run_there_and_it_shrinks_back(starts_processes, tmp_path):
    temp = Path(tempfile.mkdtemp(prefix="dsq-as-"))  # short: Ray's socket paths have a length limit
    port = free_port()
    address = f"127.0.0.1:{port}"
    (temp / "autoscaling.json").write_text(json.dumps(autoscaling_config(address)))
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
         "--memory=2000000000", f"--object-store-memory={OBJECT_STORE}", "--include-dashboard=false",
         "--disable-usage-stats", f"--temp-dir={temp}", f"--ray-client-server-port={free_port()}",
         f"--autoscaling-config={temp / 'autoscaling.json'}", *ray_node_ports()],
        env=ENV | {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}, stdout=open(temp / "head.log", "w"),
        stderr=subprocess.STDOUT, start_new_session=True, cwd=temp)
    env = {"DSQ_HOME": str(tmp_path), "DSQ_DATABASE_URL": f"sqlite:///{tmp_path / 'dsq.db'}", "RAY_ADDRESS": address,
           "DSQ_WORKER_AUTOSTART": "0", "DSQ_GPU_DEVICE": "cpu"}
    watch = worker = engine = None
    try:
        head_up(head, temp / "head.log", 300)
        watch = Watch(address, temp)
        watch.until(lambda view: view["nodes"], 300, "the head did not come up")
        train = dsq(env, "submit", "train", "--dataset", "digits", "--target", "classifier", *NARROW,
                    "--objective", "standard", "--sigma", "0", "--epochs", "1")
        certify = dsq(env, "submit", "certify", "--dataset", "digits", "--classifier", "job:1", "--sigma", "0.25",
                      "--n0", "20", "--n", "2000", "--batch-size", "1000", "--max-images", "2", "--workers", "1")
        ids = [int(out.stdout.split()[-1]) for out in (train, certify)]
        queued = time.time()
        worker = subprocess.Popen([sys.executable, "-m", "cli", "worker", "--max-request", CAP], env=ENV | env,
                                  stdout=open(tmp_path / "worker.log", "w"), stderr=subprocess.STDOUT,
                                  start_new_session=True)
        gpu_up = watch.until(alive_gpu, 300, "no gpu node was launched")
        engine = open_database(env["DSQ_DATABASE_URL"])
        deadline = time.monotonic() + 600
        while not all(job.finished for job in jobs(engine, ids)):
            assert time.monotonic() < deadline and worker.poll() is None, (tmp_path / "worker.log").read_text()
            time.sleep(0.5)
        ran = jobs(engine, ids)
        assert [job.status for job in ran] == ["succeeded", "succeeded"], (tmp_path / "worker.log").read_text()
        emptied = max(job.finished_at for job in ran).timestamp()
        gpu_gone = watch.until(lambda view: view["t"] > emptied and not alive_gpu(view), 300,
                               "the gpu node was not removed once the queue was empty")
        # the trainer and the sampler ran on the gpu node, the only one with a GPU, launched once (a node lost
        # meanwhile would have left its jobs to run again on another); no api node was ever launched
        gpus = watch.gpu_nodes()
        assert len(gpus) == 1, watch.seen[-1]
        placed = {(a["cls"], a["node"]) for view in watch.seen for a in view["actors"]
                  if a["cls"] in ("TrainerActor", "SamplerActor") and a["state"] == "ALIVE"}
        assert {cls for cls, _ in placed} == {"TrainerActor", "SamplerActor"} and {n for _, n in placed} <= gpus
        assert not any(n["resources"].get("dsq_api") for view in watch.seen for n in view["nodes"])
        with session_scope(engine) as session:
            assert {r.device for r in repo.results_for_job(session, ids[1])} == {"cpu"}
        claimed = min(job.started_at for job in ran).timestamp()
        on_gpu = min(view["t"] for view in watch.seen for a in view["actors"]
                     if a["cls"] == "TrainerActor" and a["state"] == "ALIVE" and a["node"] in gpus)
        print(f"\nautoscaling, seconds after the worker started on a queue of GPU jobs: first job claimed "
              f"{claimed - queued:.1f}, gpu node up {gpu_up - queued:.1f}, its trainer running there "
              f"{on_gpu - queued:.1f}, both jobs done {emptied - queued:.1f}; gpu node removed "
              f"{gpu_gone - emptied:.1f} s after the queue emptied")
    finally:
        if engine is not None:
            engine.dispose()
        for process in (worker, watch.process if watch else None, head):
            if process is not None:  # the head's `ray start --block` often waits out a long grace
                _stop_group(process, grace=5 if process is head else 20)
        stop_leftovers(temp)
        shutil.rmtree(temp, ignore_errors=True)


def jobs(engine, ids):
    with session_scope(engine) as session:
        found = [repo.get_job(session, job_id) for job_id in ids]
        session.expunge_all()
        return found
