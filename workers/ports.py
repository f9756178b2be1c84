"""Free ports on this machine, for the Ray nodes that tests and benchmarks ``ray start`` beside other Rays."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_node_ports() -> list[str]:
    """`ray start` options that put every port of a node on a free one (other Rays may run on this machine)."""
    names = ("node-manager-port", "object-manager-port", "metrics-export-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "runtime-env-agent-port", "min-worker-port")
    ports = {name: free_port() for name in names}
    ports["max-worker-port"] = ports["min-worker-port"] + 40
    return [f"--{name}={port}" for name, port in ports.items()]
