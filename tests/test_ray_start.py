"""Starting a local Ray on a busy machine (workers.resources.connect).

Ray gives a new node a fixed 30 s to register and then raises a bare Exception, leaving the node's processes behind.
A machine slow enough for that cannot be made on demand, so these tests stand a process in for the half-started
node and let ``ray.init`` fail the way Ray fails.
"""

import subprocess

import psutil
import pytest
import ray

from dsq.errors import ClusterUnreachable
from workers import resources

TIMED_OUT = ("The current node timed out during startup. This could happen because some of the raylet failed to "
             "startup or the GCS has become overloaded.")


@pytest.fixture
def slow_machine(monkeypatch, starts_processes):
    """``ray.init`` fails ``failures`` times, each time leaving a process of the node it started behind."""
    state = {"failures": 0, "calls": 0, "left": [], "shutdowns": 0}

    def init(**options):
        state["calls"] += 1
        if state["calls"] <= state["failures"]:
            state["left"].append(subprocess.Popen(["sleep", "300"]))
            raise Exception(TIMED_OUT)  # noqa: TRY002 - what Ray raises

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "shutdown", lambda: state.__setitem__("shutdowns", state["shutdowns"] + 1))
    yield state
    for process in state["left"]:
        process.kill()
        process.wait()


def test_a_local_ray_that_timed_out_is_stopped_and_started_again(slow_machine):
    slow_machine["failures"] = 2
    resources.connect(None, num_cpus=1)
    assert slow_machine["calls"] == 3 and slow_machine["shutdowns"] == 2
    for process in slow_machine["left"]:  # what the failed starts left behind was stopped (`sleep 300` otherwise)
        process.wait(timeout=10)
        assert not psutil.pid_exists(process.pid)


def test_a_local_ray_that_never_starts_is_one_clear_line(slow_machine):
    slow_machine["failures"] = resources.LOCAL_START_TRIES
    with pytest.raises(ClusterUnreachable) as raised:
        resources.connect(None, num_cpus=1)
    message = str(raised.value)
    assert message.startswith("cannot reach Ray at a local Ray: The current node timed out during startup")
    assert "\n" not in message and slow_machine["calls"] == resources.LOCAL_START_TRIES


def test_other_start_errors_are_not_retried(monkeypatch):
    calls = []

    def init(**options):
        calls.append(options)
        raise ValueError("num_cpus must be positive")

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(ClusterUnreachable, match="num_cpus must be positive"):
        resources.connect(None, num_cpus=1)
    assert len(calls) == 1


def test_the_ports_of_a_node_are_all_its_own_and_none_lies_in_its_workers_range():
    """Ray refuses to start a node whose components share a port; a free port picked twice (the kernel may hand a
    just-released one out again) made a test's `ray start` fail that way."""
    from workers.ports import free_port, ray_node_ports

    for _ in range(50):
        head = [free_port(), free_port()]  # a head's GCS and client-server ports, then its components'
        options = dict(option.removeprefix("--").split("=") for option in ray_node_ports())
        low, high = int(options.pop("min-worker-port")), int(options.pop("max-worker-port"))
        ports = head + [int(port) for port in options.values()]
        assert len(set(ports)) == len(ports) == 8 and high - low == 40
        assert not any(low <= port <= high for port in ports)
