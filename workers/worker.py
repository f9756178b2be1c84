"""The queue worker: claims runnable jobs, runs each in a thread on Ray, keeps heartbeats, stops cleanly.

One worker drives one Ray (the cluster it is connected to). It starts jobs highest priority first
while the resources of the jobs it runs leave room (``dsq.kinds``: a train job holds a CPU or a GPU,
a certify job its sampler actors), and at least one job whatever its size. Several workers may
share a database: claims are atomic (``dsq.jobqueue``). A stopping worker hands its jobs back to the
queue; a killed one leaves stale heartbeats, and any worker requeues such jobs: at once when it can tell the killed
worker is dead (it ran on this machine and its process is gone, or Ray reports its node or actor dead), else once
they are stale.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Callable

import ray
from sqlalchemy import exc

from dsq import jobqueue, kinds
from dsq.db import repo
from dsq.db.models import utcnow
from dsq.db.session import database_back, is_outage, open_database, session_scope
from dsq.errors import DsqError
from dsq.kinds.certify_api import API_RESOURCE
from dsq.settings import Settings
from workers import pidfile, resources, runner
from workers.loop import Control
from workers.pool import ActorPool

TICK_SECONDS = 0.5  # how often the worker looks at the queue; a claim costs one small transaction
HEARTBEAT_SECONDS = 5.0  # a dozen beats fit in the default 60 s stale limit
JOIN_SECONDS = 60.0  # a stopping job hands itself back within a poll; this bounds a stuck one
REQUEST_JOBS = 100  # runnable jobs looked at when asking an autoscaler for resources
QUIET_SECONDS = 3 * HEARTBEAT_SECONDS  # a running job this long without a heartbeat may have lost its worker
# The actors kept for the next job (ActorPool) end once the worker has had nothing to run this long: long enough for
# the next step of a plan submitted by hand, short enough that an idle worker does not hold CPUs that another
# worker's jobs, or an autoscaler shrinking the cluster, wait for.
KEEP_ACTORS_SECONDS = 30.0
# A detached worker that met an unexpected error (a Ray call that timed out on a loaded cluster, say) ends its process
# and Ray starts it again; this pause keeps an error that comes back every time from looping fast.
CRASH_PAUSE_SECONDS = 5.0


def demand_bundles(demands: list[dict], cap: dict) -> list[dict]:
    """The resource bundles to ask an autoscaler for: jobs in queue order while their total fits in ``cap``.

    A job whose demand would pass the cap is left out (later, smaller ones may still fit); resources
    the cap does not name are not limited.
    """
    bundles, total = [], {}
    for demand in demands:
        grown = {r: total.get(r, 0.0) + amount for r, amount in demand.items()}
        if all(grown[r] <= cap[r] + 1e-9 for r in grown if r in cap) and demand:
            bundles.append(dict(demand))
            total.update(grown)
    return bundles


@dataclass
class Running:
    job_id: int
    kind: str
    demand: dict
    control: Control
    spec: object
    thread: threading.Thread | None = None
    status: str | None = None


@dataclass
class Summary:
    ran: dict = field(default_factory=dict)  # job id -> final status ("queued" when handed back)
    handed_back: list = field(default_factory=list)
    reason: str = "queue drained"
    database_lost: bool = False


class QueueWorker:
    """Drains the queue of ``settings.database_url`` on the Ray this process is connected to."""

    def __init__(self, settings: Settings, *, max_jobs: int | None = None, drain: bool = False,
                 idle_exit: float | None = None, only: set[int] | None = None,
                 log: Callable[[str], None] = print, name: str | None = None, max_request: dict | None = None,
                 reuse_samplers: bool = True):
        self.settings, self.max_jobs, self.drain, self.idle_exit = settings, max_jobs, drain, idle_exit
        self.only, self.log = only, log
        self.max_request, self.requested = max_request, None  # autoscaling: the cap, and what was last asked
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
        self.running: dict[int, Running] = {}
        self.lost: set[int] = set()  # jobs whose run ended in an outage, left "running" until queued again
        self.pool = ActorPool()  # samplers and trainers kept from job to job
        self.reuse_samplers = reuse_samplers  # False only to measure what reuse saves (dsq bench --queue)
        self.stopping = threading.Event()
        self.wake = threading.Event()  # a job ended or a stop came: look at the queue now, not at the next tick
        self.summary = Summary()

    def stop(self, reason: str) -> None:
        """Stop claiming and hand running jobs back (safe from a signal handler)."""
        self.summary.reason = reason
        self.stopping.set()
        self.wake.set()

    def run(self) -> Summary:
        """Serve until drained, idle long enough, stopped, or the database is gone for its grace. However it ends
        (an unexpected error included, which is raised once this is done), its jobs go back to the queue and the
        worker is recorded as stopped, so the next submit starts another; only a lost database leaves that to the
        worker that takes its jobs over."""
        engine = open_database(self.settings.database_url, retry_seconds=self.settings.db_grace_seconds)
        try:
            self._register(engine)
            self._loop(engine)
        except exc.DBAPIError as error:
            if not is_outage(error):
                raise
            lost = ", ".join(map(str, sorted(set(self.running) | self.lost))) or "none"
            self.summary.reason = (f"database unreachable for {self.settings.db_grace_seconds:.0f} s; jobs left "
                                   f"running: {lost} (a worker takes them over once it is back)")
            self.summary.database_lost = True
        finally:
            try:
                self._hand_back_all()
                self.pool.close()
                if self.requested:
                    self._request([])  # nothing asked for any more: an autoscaler may shrink the cluster
            finally:
                if not self.summary.database_lost:
                    with session_scope(engine) as session:
                        jobqueue.stop_worker(session, self.name)
                engine.dispose()
                pidfile.forget(self.settings)  # a background one (killed, idle, drained): the next submit starts one
        return self.summary

    def _register(self, engine) -> None:
        with session_scope(engine) as session:
            requeued, failed = jobqueue.requeue_runner(session, self.name)  # a restarted actor keeps its name
            for job_id in requeued:
                repo.add_log(session, job_id, f"{self.name} restarted: queued again", level="warning")
            self._gave_up(session, failed)
            context = ray.get_runtime_context()
            jobqueue.register_worker(session, name=self.name, host=socket.gethostname(), pid=os.getpid(),
                                     address=self.settings.ray_address, max_jobs=self.max_jobs or 0,
                                     resources=self._offers(ray.cluster_resources()),
                                     node_id=context.get_node_id(), actor_id=context.get_actor_id())

    def _loop(self, engine) -> None:
        cluster = self._placeable(ray.cluster_resources())
        self._last_beat = self._last_scan = 0.0
        self._idle_since = time.monotonic()
        while not self.stopping.is_set():
            try:
                if self._tick(engine, cluster):
                    return
            except exc.DBAPIError as error:  # a statement cut off by the server going away: wait for it, or stop
                if not is_outage(error) or not database_back(engine, self.settings.db_grace_seconds):
                    raise
                continue
            self.wake.wait(TICK_SECONDS)
            self.wake.clear()

    def _tick(self, engine, cluster: dict) -> bool:
        """Reap, beat, scan, start jobs; True when the worker is done (drained, or idle long enough)."""
        self._reap(engine)
        now = time.monotonic()
        if now - self._last_beat >= HEARTBEAT_SECONDS:
            with session_scope(engine) as session:
                jobqueue.worker_heartbeat(session, self.name, list(self.running), free=self._free(cluster))
            self._last_beat = now
        if now - self._last_scan >= HEARTBEAT_SECONDS:
            self._requeue_stale(engine)
            self._requeue_dead(engine)
            self._ask_for_resources(engine, cluster)
            self._last_scan = now
        self._fill(engine, cluster)
        if not self.running and self.pool.idle and now - self._idle_since > KEEP_ACTORS_SECONDS:
            self.pool.close()
        if self.running:
            self._idle_since = now
        elif self._finished(engine):
            return True
        elif self.idle_exit is not None and now - self._idle_since > self.idle_exit:
            if self._retire(engine):
                self.summary.reason = f"idle for {self.idle_exit:.0f} s"
                return True
            self._idle_since = now
        return False

    def _retire(self, engine) -> bool:
        """Stop serving, then look at the queue once more: a job submitted meanwhile is seen here, or its submit
        saw no live worker and started one. Serve again (False) when something became runnable."""
        with session_scope(engine) as session:
            jobqueue.stop_worker(session, self.name)
        mine = pidfile.forget(self.settings)
        with session_scope(engine) as session:
            if not jobqueue.runnable_jobs(session, limit=1, only=self.only) and not jobqueue.retrying(session):
                return True
            jobqueue.serve_again(session, self.name)
        if mine:
            pidfile.remember(self.settings)
        return False

    def _finished(self, engine) -> bool:
        """With --drain: nothing left can run (for this worker's jobs, when it has a list).

        Left to run: a queued job, unless it waits (transitively) for a failed or cancelled job, which nothing
        runs until it is resumed (named in the log, not waited for); and a running job without a recent
        heartbeat, whose worker may be dead (it is taken over once stale, or its heartbeat comes back).
        """
        if not self.drain:
            return False
        with session_scope(engine) as session:
            blocked = jobqueue.blocked_queued(session)
            if self.only is not None:
                ended = [repo.get_job(session, job_id) for job_id in sorted(self.only)]
                if not all(job.finished or job.id in blocked for job in ended):
                    return False
                blocked = {job_id: why for job_id, why in blocked.items() if job_id in self.only}
            else:
                if sum(jobqueue.queued_counts(session).values()) > len(blocked):
                    return False
                if jobqueue.quiet_running(session, timedelta(seconds=QUIET_SECONDS), besides=self.name):
                    return False
        for job_id, (dependency, root, status) in sorted(blocked.items()):
            self.log(_blocked_line(job_id, dependency, root, status))
        if blocked:
            self.summary.reason = (f"queue drained; {len(blocked)} queued job(s) can never run as things stand "
                                   f"(dsq resume or dsq cancel the jobs they wait for)")
        return True

    def _ask_for_resources(self, engine, cluster: dict) -> None:
        """With a cap (``--max-request``): ask the autoscaler for what running and runnable jobs need."""
        if self.max_request is None:
            return
        grown = {**cluster, **{r: max(cluster.get(r, 0.0), amount) for r, amount in self.max_request.items()}}
        with session_scope(engine) as session:
            waiting = jobqueue.runnable_jobs(session, limit=REQUEST_JOBS, only=self.only)
            demands = [work.demand for work in self.running.values()] + [self._demand(j, grown) for j in waiting]
        self._request(demand_bundles(demands, self.max_request))

    def _request(self, bundles: list[dict]) -> None:
        if bundles != self.requested:
            from ray.autoscaler.sdk import request_resources

            request_resources(bundles=bundles)
            self.requested = bundles
            self.log(f"asked the autoscaler for {len(bundles)} bundle(s): {_total(bundles)}")

    def _offers(self, cluster: dict) -> dict:
        """What this worker's Ray can offer its jobs: the cluster, grown to the autoscaling cap (``--max-request``)."""
        cap = self.max_request or {}
        names = {"CPU", "GPU", *cap} | ({API_RESOURCE} & cluster.keys())
        return {r: max(cluster.get(r, 0.0), cap.get(r, 0.0)) for r in sorted(names)}

    def _placeable(self, cluster: dict) -> dict:
        """Ray's ``cluster_resources()`` with the GPUs and custom resources the autoscaling cap names (gpu nodes,
        ``dsq_api`` nodes: what the autoscaler can launch), so a job that asks for them is started, sized for them
        (a certify job's samplers, a training: on GPUs), and its actors wait for such nodes. CPUs stay those of the
        nodes up: a cap's CPUs would size CPU jobs for nodes that may never come."""
        cap = self.max_request or {}
        return {**cluster, **{r: max(cluster.get(r, 0.0), a) for r, a in cap.items() if r != "CPU"}}

    def _free(self, cluster: dict) -> dict:
        """What the jobs this worker runs leave of its cluster (recorded with each heartbeat, for ``dsq jobs``)."""
        held = self._held()
        return {r: max(0.0, cluster.get(r, 0.0) - held.get(r, 0.0)) for r in sorted({"CPU", "GPU", *held})}

    def _gave_up(self, session, failed: list[int]) -> None:
        for job_id in failed:
            job = repo.get_job(session, job_id)
            repo.add_log(session, job_id, f"failed: {job.error} (seen by {self.name})", level="error")
            self.log(f"job {job_id}: failed: {job.error}")

    def _requeue_stale(self, engine) -> None:
        with session_scope(engine) as session:
            requeued, failed = jobqueue.requeue_stale(session, self.settings.stale_after)
            for job_id in requeued:
                repo.add_log(session, job_id, f"heartbeat stale: queued again (seen by {self.name})", level="warning")
                self.log(f"job {job_id}: its worker is gone (stale heartbeat); queued again")
            self._gave_up(session, failed)
            for job_id in jobqueue.cancel_stale(session, self.settings.stale_after):
                repo.add_log(session, job_id, f"cancelled: its worker is gone (seen by {self.name})")
                self.log(f"job {job_id}: its worker is gone (stale heartbeat); cancelled, as requested")

    def _requeue_dead(self, engine) -> None:
        """Workers known dead are dead now, not in a minute: their jobs go back to the queue at once. Known dead: a
        worker registered on this machine whose process is gone (kill -9), or one whose Ray node or actor Ray
        reports dead (``dead_on_ray``). The stale heartbeat limit stays for the rest."""
        host = socket.gethostname()
        with session_scope(engine) as session:
            dead = [(w.name, w.started_at, f"pid {w.pid} is gone") for w in jobqueue.workers_on(session, host)
                    if w.name != self.name and pidfile.gone(w.pid, w.started_at)]
            placed = [w for w in jobqueue.ray_workers(session) if w.name not in {self.name, *(d[0] for d in dead)}]
            dead += [(w.name, w.started_at, why) for w, why in dead_on_ray(placed)]
        for name, registered, why in dead:
            with session_scope(engine) as session:
                requeued, failed, cancelled = jobqueue.retire_worker(session, name, why=why, started_at=registered)
                self._gave_up(session, failed)
                for job_id in requeued:
                    repo.add_log(session, job_id, f"worker {name} died ({why}): queued again (seen by {self.name})",
                                 level="warning")
                    self.log(f"job {job_id}: its worker {name} died ({why}); queued again")
                for job_id in cancelled:
                    repo.add_log(session, job_id, f"cancelled: worker {name} died (seen by {self.name})")
                    self.log(f"job {job_id}: its worker {name} died ({why}); cancelled, as requested")

    def _fill(self, engine, cluster: dict) -> None:
        while not self.stopping.is_set() and (self.max_jobs is None or len(self.running) < self.max_jobs):
            with session_scope(engine) as session:
                head = jobqueue.runnable_jobs(session, limit=1, only=self.only)
                if not head or (self.running and not self._fits(self._demand(head[0], cluster), cluster)):
                    return
                job = jobqueue.claim(session, self.name, only=self.only)
                if job is None:
                    return
            spec = kinds.from_dict(job.spec)  # rebuilt once: for its demand here, and for its run
            self._start(job, spec, kinds.get(job.kind).demand(spec, cluster), cluster)

    @staticmethod
    def _demand(job, cluster: dict) -> dict:
        return kinds.get(job.kind).demand(kinds.from_dict(job.spec), cluster)

    def _held(self) -> dict:
        """What the jobs this worker runs hold, by resource."""
        held = {}
        for work in self.running.values():
            for resource, amount in work.demand.items():
                held[resource] = held.get(resource, 0.0) + amount
        return held

    def _fits(self, demand: dict, cluster: dict) -> bool:
        held = self._held()
        return all(held.get(r, 0.0) + amount <= cluster.get(r, 0.0) + 1e-9 for r, amount in demand.items())

    def _start(self, job, spec, demand: dict, cluster: dict) -> None:
        pool = self.pool if self.reuse_samplers else None
        control = Control(runner=self.name, pool=pool, demand=demand, cluster=cluster)
        work = Running(job.id, job.kind, demand, control, spec)
        work.thread = threading.Thread(target=self._run_one, args=(work,), name=f"dsq-job-{job.id}", daemon=True)
        self.running[job.id] = work
        self.log(f"job {job.id} ({job.kind}{': ' + job.name if job.name else ''}): started")
        work.thread.start()

    def _run_one(self, work: Running) -> None:
        try:
            work.status = runner.run_job(self.settings, work.job_id, work.control, work.spec)
        except Exception as error:  # noqa: BLE001 - the job is left for the stale scan; the worker goes on
            work.status = f"error: {type(error).__name__}: {error}"
        finally:
            self.wake.set()

    def _reap(self, engine) -> None:
        for job_id in [j for j, work in self.running.items() if not work.thread.is_alive()]:
            work = self.running.pop(job_id)
            self.summary.ran[job_id] = work.status
            self.log(f"job {job_id} ({work.kind}): {work.status}")
            if work.status == runner.LOST:
                self.lost.add(job_id)
        for job_id in sorted(self.lost):  # the database is back: queue it again now, not once its heartbeat is stale
            with session_scope(engine) as session:
                if jobqueue.release(session, job_id, self.name):
                    repo.add_log(session, job_id, f"{self.name}: the database came back, queued again", level="warning")
                    self.log(f"job {job_id}: the database came back; queued again")
            self.lost.discard(job_id)

    def _hand_back_all(self) -> None:
        for work in self.running.values():
            work.control.stop.set()
        deadline = time.monotonic() + JOIN_SECONDS
        for work in list(self.running.values()):
            work.thread.join(timeout=max(0.0, deadline - time.monotonic()))
        for job_id, work in self.running.items():
            self.summary.ran[job_id] = work.status
            if work.status == "queued":
                self.summary.handed_back.append(job_id)
        self.running.clear()


def dead_on_ray(workers: list) -> list[tuple[object, str]]:
    """The workers (rows) whose Ray node, or detached actor, the connected Ray reports dead, each with why.

    One call for the nodes (``ray.nodes()``, a few milliseconds: the GCS's table), and one per worker with an actor
    whose heartbeat is quiet (an actor restarted on another node keeps its name and takes its jobs back itself;
    only one Ray will not restart is dead). A node or actor this Ray does not know (another cluster's), or a question
    Ray does not answer, is not judged: the worker's heartbeat decides.
    """
    if not workers:
        return []
    from ray._private.state import state  # the GCS's actor table: no dashboard needed, unlike ray.util.state

    try:
        alive = {node["NodeID"]: node["Alive"] for node in ray.nodes()}
    except Exception:  # noqa: BLE001 - the GCS busy or away: nobody is judged this time
        return []
    quiet = utcnow() - timedelta(seconds=2 * HEARTBEAT_SECONDS)
    dead = []
    for worker in workers:
        if alive.get(worker.node_id) is False:
            dead.append((worker, f"its Ray node {worker.node_id[:12]} is dead"))
        elif worker.actor_id and worker.heartbeat_at < quiet and _actor_state(state, worker.actor_id) == "DEAD":
            dead.append((worker, f"its Ray actor {worker.actor_id[:12]} is dead"))
    return dead


def _actor_state(state, actor_id: str) -> str | None:
    try:
        return state.actor_table(actor_id).get("State")
    except Exception:  # noqa: BLE001 - not answered: unknown
        return None


def _blocked_line(job_id: int, dependency: int, root: int, status: str) -> str:
    """What a draining worker says of a queued job that can never run."""
    if dependency == job_id:
        return f"job {job_id} is queued with a cancel requested: nothing will run it (dsq cancel {job_id} ends it)"
    through = f" (through job {dependency})" if dependency != root else ""
    then = f"dsq cancel {root} ends it" if status == "cancel requested" else f"dsq resume {root} lets it run"
    return f"job {job_id} waits for job {root} ({status}){through}: nothing can run it ({then})"


def _total(bundles: list[dict]) -> str:
    total = {}
    for bundle in bundles:
        for resource, amount in bundle.items():
            total[resource] = total.get(resource, 0.0) + amount
    return ", ".join(f"{resource} {amount:g}" for resource, amount in sorted(total.items())) or "nothing"


@ray.remote(num_cpus=0, max_restarts=-1)
class WorkerActor:
    """A detached queue worker on a cluster (``dsq worker --detach``); Ray restarts it if its process dies, which it
    makes happen itself on an unexpected error (said in its log), so a cluster never loses its worker to one.

    It works in its constructor's thread: an actor's creation belongs to the cluster, a method
    call would belong to the CLI process that may exit. It ends itself when it has been idle.
    """

    def __init__(self, settings: Settings, max_jobs: int | None, idle_exit: float | None, max_request: dict | None):
        name = ray.get_runtime_context().get_actor_name()  # stable across restarts: it takes its jobs back
        self.worker = QueueWorker(settings, max_jobs=max_jobs, idle_exit=idle_exit, log=lambda line: None, name=name,
                                  max_request=max_request)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.worker.run()
        except DsqError as error:  # said in words (the database gone for good, say): it ends, as told
            print(f"dsq worker {self.worker.name}: {error}", file=sys.stderr)
        except Exception:  # noqa: BLE001 - unexpected: said in this actor's log, and served again by a new process
            traceback.print_exc()
            time.sleep(CRASH_PAUSE_SECONDS)
            os._exit(1)  # Ray starts the actor again (max_restarts=-1), under its name: it takes its jobs back
        finally:  # done (idle, or stopped on purpose): the actor ends for good
            ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    def name(self) -> str:
        return self.worker.name


def start_detached(settings: Settings, *, max_jobs: int | None = None, idle_exit: float | None = None,
                   max_request: dict | None = None) -> str:
    """Start a worker on the connected cluster, preferring the head node; return its name."""
    actor = WorkerActor.options(name=f"dsq-worker-{uuid.uuid4().hex[:8]}", lifetime="detached",
                                scheduling_strategy=resources.on_head_node()).remote(settings, max_jobs, idle_exit,
                                                                                     max_request)
    return ray.get(actor.name.remote())

