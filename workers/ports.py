"""Free ports on this machine, for the Ray nodes that tests and benchmarks ``ray start`` beside other Rays."""

from __future__ import annotations

import contextlib
import socket

WORKER_PORTS = 41  # a node's range of ports for its worker processes: --min-worker-port to --max-worker-port
_given: set[int] = set()  # every port handed out by this process: a port is free until its user binds it, so one
# picked for a node's GCS could otherwise be picked again, moments later, for its client server


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports, none handed out before by this process: held open together while the kernel
    picks them, so that it cannot pick one twice."""
    while True:
        with contextlib.ExitStack() as stack:
            sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
            for sock in sockets:
                sock.bind(("127.0.0.1", 0))
            ports = [sock.getsockname()[1] for sock in sockets]
        if _given.isdisjoint(ports):
            _given.update(ports)
            return ports


def ray_node_ports() -> list[str]:
    """`ray start` options that put every port of a node on a free one (other Rays may run on this machine), each
    port its own: Ray refuses to start a node whose components would share one."""
    names = ("node-manager-port", "object-manager-port", "metrics-export-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "runtime-env-agent-port")
    while True:
        *ports, low = free_ports(len(names) + 1)
        workers = set(range(low + 1, low + WORKER_PORTS))
        if _given.isdisjoint(workers):  # none of this node's other ports, nor any handed out before, nor later
            _given.update(workers)
            break
    return ([f"--{name}={port}" for name, port in zip(names, ports)]
            + [f"--min-worker-port={low}", f"--max-worker-port={low + WORKER_PORTS - 1}"])
