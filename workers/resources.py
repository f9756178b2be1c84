"""Connecting to Ray and sizing actors for the cluster at hand."""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import threading

import psutil
import ray

import dsq
from dsq import checks
from dsq.errors import ClusterUnreachable, VersionMismatch

NAMESPACE = "dsq"
# The address of a Ray already running on this machine that a process joins instead of starting its own local Ray
# (the test suite starts one for all its `dsq` processes). Nothing else changes: no --address is set, so workers,
# background workers and jobs behave as with a local Ray (README.md, "Running the tests").
LOCAL_RAY = "DSQ_LOCAL_RAY_ADDRESS"


def connect(address: str | None, *, num_cpus: int | None = None) -> None:
    """Join the cluster at ``address``, or start a local Ray in this process."""
    if address:
        check_reachable(address)
    if ray.is_initialized():
        return
    # dsq handles every task's failure itself; Ray's own report of an unread failed reference is noise.
    os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    # Python must match in major.minor, as Ray's client (ray://) asks; a patch release apart pickles the same.
    os.environ.setdefault("RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL", "minor")
    handlers = _python_handlers()
    try:
        if address:
            ray.init(address=address, namespace=NAMESPACE, logging_level="ERROR", log_to_driver=False)
        elif os.environ.get(LOCAL_RAY):  # a Ray of this machine, already running, stands in for the local one
            ray.init(address=os.environ[LOCAL_RAY], namespace=NAMESPACE, logging_level="ERROR", log_to_driver=False)
        else:
            _start_local(num_cpus or os.cpu_count())
    except Exception as error:  # Ray raises a bare Exception when a node does not come up in time
        theirs = ray_mismatch(error)
        if theirs is not None:
            raise VersionMismatch(mismatch_line(*theirs)) from None
        where = address or "a local Ray"
        first = checks.first_line(error)
        raise ClusterUnreachable(f"cannot reach Ray at {where}: {first}") from None
    for number, handler in handlers.items():  # Ray's start puts its own SIGTERM handler (a C++ stack dump) in place
        signal.signal(number, handler)
    if address:
        check_versions()


def _python_handlers() -> dict:
    """The SIGINT and SIGTERM handlers this process set in Python (a command's StopSignals), to restore after Ray's
    start; none off the main thread, where Python cannot set handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    found = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    return {number: handler for number, handler in found.items() if callable(handler)
            and handler is not signal.default_int_handler}


def versions() -> dict:
    """This process's Ray, Python (major.minor) and dsq versions."""
    return {"ray": ray.__version__, "python": "%d.%d" % sys.version_info[:2], "dsq": dsq.__version__}


@ray.remote(num_cpus=0)
def _versions_there() -> dict:
    return versions()


VERSIONS_SECONDS = 60.0  # a task on the head: a second or two on a live cluster


def check_versions(timeout: float = VERSIONS_SECONDS) -> None:
    """Refuse, in one line, a cluster whose head runs another Ray, Python or dsq than this process.

    Ray's own check (in ``ray.init``) has compared Ray and Python; dsq's version needs a task, on the head node where
    the queue worker runs. A cluster too busy to answer in ``timeout`` is not refused.
    """
    mine = versions()
    try:
        theirs = ray.get(_versions_there.options(scheduling_strategy=on_head_node()).remote(), timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        return
    except ray.exceptions.RayError as error:  # no dsq there at all (its modules do not import), or a crash
        ray.shutdown()
        raise VersionMismatch(f"the cluster cannot run dsq ({checks.first_line(error)}); this client runs "
                              f"{_named(mine)}: install the same versions on the cluster's nodes") from None
    line = mismatch_line(theirs, mine)
    if line:
        ray.shutdown()
        raise VersionMismatch(line)


def mismatch_line(theirs: dict, mine: dict) -> str | None:
    """The one line that says the cluster's versions (``versions()``) differ from this client's, else None. A
    version one side does not know (dsq's, when Ray refused before a task could run) is not compared."""
    if all(theirs.get(name) in (None, version) for name, version in mine.items()):
        return None
    return (f"the cluster runs {_named(theirs)}; this client runs {_named(mine)}: "
            f"use the same versions on both sides")


def _named(found: dict) -> str:
    return " / ".join(f"{label} {found[name]}" for name, label in (("ray", "Ray"), ("python", "Python"),
                                                                  ("dsq", "dsq")) if found.get(name))


# Ray's own refusal in ray.init: "Version mismatch: The cluster was started with:\n    Ray: 2.59.0\n    Python:
# 3.10.12\nThis process on node 10.0.0.5 was started with:\n    Ray: 2.60.0\n    Python: 3.11.7\n"
_RAY_SAYS = re.compile(r"Ray: (\S+)\s+Python: (\S+)")


def ray_mismatch(error: BaseException) -> tuple[dict, dict] | None:
    """The cluster's and this client's versions out of Ray's version-mismatch error (None for any other error)."""
    text = str(error)
    found = _RAY_SAYS.findall(text)
    if "Version mismatch" not in text or len(found) != 2:
        return None
    (ray_there, python_there), (ray_here, python_here) = found
    return ({"ray": ray_there, "python": python_there},
            {"ray": ray_here, "python": python_here, "dsq": dsq.__version__})


def on_head_node():
    """A soft affinity to the head node (None when the head is unknown: Ray's default)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    heads = [node["NodeID"] for node in ray.nodes()
             if node.get("Alive") and "node:__internal_head__" in node.get("Resources", {})]
    return NodeAffinitySchedulingStrategy(node_id=heads[0], soft=True) if heads else None


# Ray gives a starting node a fixed 30 s to register. On a machine busy with other work (several local Rays starting
# at once, a test suite beside) that can pass; a second or third start then usually succeeds.
LOCAL_START_TRIES = 3


def _start_local(num_cpus: int) -> None:
    for attempt in range(1, LOCAL_START_TRIES + 1):
        before = {child.pid for child in psutil.Process().children(recursive=True)}
        try:
            ray.init(num_cpus=num_cpus, include_dashboard=False, namespace=NAMESPACE, logging_level="ERROR",
                     log_to_driver=False, _node_ip_address="127.0.0.1")
            return
        except Exception as error:
            if attempt == LOCAL_START_TRIES or "timed out during startup" not in str(error):
                raise
            ray.shutdown()
            # the processes of the node that did not come up (GCS, raylet, ...): this process started them
            _stop([child for child in psutil.Process().children(recursive=True) if child.pid not in before])


def _stop(processes: list) -> None:
    for process in processes:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(processes, timeout=10)


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast (Ray itself retries for minutes) when ``host:port`` does not accept connections."""
    target = address.split("://", 1)[-1]
    if target in ("auto", "local") or ":" not in target:
        return
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as error:
        raise ClusterUnreachable(f"cannot reach Ray at {address}: {error}") from None


def actor_options(workers: int, cluster: dict | None = None) -> tuple[dict, int]:
    """Ray options for one of ``workers`` compute actors, and its torch thread count.

    With GPUs each actor takes one GPU, or an equal fraction of the GPUs when there are
    more actors than GPUs. On CPUs the actors share the cluster's CPUs as fractions (never
    whole CPUs that could starve other tasks), and each gets an equal share of intra-op
    threads: one thread each when there are as many actors as CPUs (the default).
    ``cluster`` is Ray's ``cluster_resources()`` (read when not given).
    """
    cluster = ray.cluster_resources() if cluster is None else cluster
    gpus = cluster.get("GPU", 0)
    if gpus >= 1:
        return {"num_gpus": min(1.0, round(gpus / workers, 4)), "num_cpus": 0}, 1
    cpus = cluster.get("CPU", 1)
    share = max(0.01, min(0.5, round(cpus * 0.5 / workers, 2)))
    threads = max(1, int(cpus // workers))
    return {"num_cpus": share}, threads


def sized_for(control) -> dict:
    """The resources a job's actors are sized for: what its worker sized it for (``Control.cluster``), else Ray's."""
    return control.cluster if control.cluster is not None else ray.cluster_resources()


# The torch device of an actor that holds a GPU. Tests set "cpu": Ray's fake GPUs (an autoscaler's fake nodes) have
# no CUDA behind them, and the results say which device ran (their `device` column).
GPU_DEVICE = "DSQ_GPU_DEVICE"


def device_for(gpu: bool) -> str:
    return os.environ.get(GPU_DEVICE, "cuda") if gpu else "cpu"
