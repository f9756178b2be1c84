"""``dsq cluster``: the Ray cluster at a glance (nodes, CPUs/GPUs, dsq actors, running jobs)."""

from __future__ import annotations

import typer
from rich.table import Table

from cli import common
from dsq.db import repo
from dsq.db.session import session_scope
from dsq.errors import ClusterUnreachable

DSQ_ACTORS = ("WorkerActor", "SamplerActor", "TrainerActor", "ApiActor")


def register(app: typer.Typer) -> None:
    app.command(name="cluster")(cluster)


def cluster(ctx: typer.Context):
    """Show the cluster's nodes, CPUs/GPUs, running dsq actors and queued/running jobs."""
    config = common.settings(ctx)
    with common.boundary():
        if not config.ray_address:
            raise ClusterUnreachable("no cluster configured: pass --address or set RAY_ADDRESS "
                                     "(without one, dsq runs each job on a local Ray in its own process)")
        from workers import resources

        resources.connect(config.ray_address)
        nodes, actors = _cluster_state()
        common.console.print(_nodes_table(nodes))
        common.console.print(_actors_table(actors))
        engine = common.database(config, write=False)
        with session_scope(engine) as session:
            active = [job for job in repo.list_jobs(session, limit=200) if job.status in ("queued", "running")]
        table = Table("job", "kind", "status", "progress", "runner", title="queued and running jobs")
        for job in active:
            table.add_row(str(job.id), job.kind, job.status, f"{job.progress_done}/{job.progress_total}",
                          job.runner or "")
        common.console.print(table)


def _nodes_table(nodes: list[dict]) -> Table:
    table = Table("node", "address", "alive", "CPU", "GPU", "memory GiB", "other resources", title="nodes")
    for node in nodes:
        table.add_row(node["id"][:12] + (" (head)" if node["head"] else ""), node["address"],
                      "yes" if node["alive"] else "no", _used(node, "CPU"), _used(node, "GPU"),
                      f"{node['resources'].get('memory', 0) / 2**30:.1f}", ", ".join(node["custom"]))
    return table


def _used(node: dict, name: str) -> str:
    total = node["resources"].get(name, 0)
    return f"{total - node['available'].get(name, total):g}/{total:g} used" if total else "-"


def _actors_table(actors: list[dict]) -> Table:
    table = Table("actor", "name", "node", "pid", title="dsq actors")
    for actor in actors:
        if actor["class"] in DSQ_ACTORS:
            table.add_row(actor["class"], actor["name"] or "", actor["node"][:12], str(actor["pid"]))
    return table


def _cluster_state() -> tuple[list[dict], list[dict]]:
    """Nodes (totals and what is free) and live actors, from the connected cluster's GCS."""
    import ray
    from ray._private import state

    free = state.available_resources_per_node()
    nodes = []
    for node in ray.nodes():
        total = node.get("Resources", {})
        nodes.append({"id": node["NodeID"], "address": f"{node['NodeManagerAddress']}:{node['NodeManagerPort']}",
                      "alive": node["Alive"], "head": "node:__internal_head__" in total, "resources": total,
                      "available": free.get(node["NodeID"], {}),
                      "custom": [f"{k}={v:g}" for k, v in total.items()
                                 if k not in ("CPU", "GPU", "memory", "object_store_memory")
                                 and not k.startswith("node:") and not k.startswith("accelerator_type")]})
    actors = [{"class": a["ActorClassName"], "name": a.get("Name"), "node": a["Address"]["NodeID"], "pid": a["Pid"]}
              for a in state.state.actor_table(None).values() if a["State"] == "ALIVE"]
    return nodes, actors
