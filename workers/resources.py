"""Connecting to Ray and sizing actors for the cluster at hand."""

from __future__ import annotations

import os
import socket

import psutil
import ray

from dsq import checks
from dsq import specs
from dsq.errors import ClusterUnreachable

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
    try:
        if address:
            ray.init(address=address, namespace=NAMESPACE, logging_level="ERROR", log_to_driver=False)
        elif os.environ.get(LOCAL_RAY):  # a Ray of this machine, already running, stands in for the local one
            ray.init(address=os.environ[LOCAL_RAY], namespace=NAMESPACE, logging_level="ERROR", log_to_driver=False)
        else:
            _start_local(num_cpus or os.cpu_count())
    except Exception as error:  # Ray raises a bare Exception when a node does not come up in time
        where = address or "a local Ray"
        first = checks.first_line(error)
        raise ClusterUnreachable(f"cannot reach Ray at {where}: {first}") from None


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


def default_workers() -> int:
    return specs.default_workers(ray.cluster_resources())


def device_for(gpu: bool) -> str:
    return "cuda" if gpu else "cpu"
