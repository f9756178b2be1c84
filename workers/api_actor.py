"""ApiActor: one per provider in the cluster, holding a token bucket and concurrency cap per service.

A named, detached actor (``dsq-api-PROVIDER``), so every job and runner on the cluster shares one bucket
per provider account (the vendor's quota is per account, not per job), and queries still in flight when
a runner dies are stored, never lost and paid again. Each service it talks to (the vendor, the embedded
emulator, an emulator at an address) gets its own client, bucket and cap (an ``AnswerDesk``). The actor
is threaded: ``max_concurrency`` threads wait on the bucket and the cap, which bounds the queries in
flight. Credentials are read by the SDK inside this process, from its own environment; they never
travel in a call. For ``endpoint="embedded"`` the actor serves an emulator in its own process.

Its database engines ride out an outage as runners and workers do (the runner's ``DSQ_DB_GRACE_SECONDS``
comes with each query): a paid answer is kept in memory until it is stored (``AnswerDesk``).
"""

from __future__ import annotations

import dataclasses
import threading

import ray

from dsq.apis import emulators, providers, ratelimit
from dsq.apis.answers import AnswerDesk
from dsq.db.session import make_engine
from dsq.errors import DsqError, MissingCredentials


@ray.remote(num_cpus=0, max_concurrency=ratelimit.MAX_CONCURRENCY + 4, max_restarts=-1, max_task_retries=3)
class ApiActor:
    def __init__(self, provider: str):
        self.provider, self.env = provider, providers.environment()
        self.desks: dict[str, AnswerDesk] = {}
        self.engines, self.emulators = {}, []
        self._lock, self._engine_lock = threading.Lock(), threading.Lock()

    def configure(self, endpoint: str | None, service: str, limits: dict) -> str | None:
        """Open (or re-limit: the latest job's limits win) the desk of a service; say why not, if it cannot."""
        try:
            self._desk(endpoint, service, limits).limiter.configure(ratelimit.Limits(**limits))
        except DsqError as error:
            return providers.scrub(str(error), self.env)
        return None

    def query(self, endpoint: str | None, service: str, limits: dict, database_url: str, job_id: int,
              digest: str, image: bytes, grace_seconds: float = 0.0) -> dict:
        """Answer one image (a restarted actor re-opens the desk from the arguments)."""
        return self._desk(endpoint, service, limits).answer(database_url, job_id, digest, image, grace_seconds)

    def stats(self, service: str) -> dict:
        return self.desks[service].stats()

    def _desk(self, endpoint: str | None, service: str, limits: dict) -> AnswerDesk:
        with self._lock:
            if service not in self.desks:
                self.desks[service] = self._open_desk(endpoint, service, limits)
            return self.desks[service]

    def _open_desk(self, endpoint: str | None, service: str, limits: dict) -> AnswerDesk:
        if endpoint == providers.EMBEDDED:
            self.emulators.append(emulators.start(self.provider))
            endpoint = self.emulators[-1].endpoint
        client = providers.make_client(self.provider, endpoint, self.env)
        limiter = ratelimit.Limiter(ratelimit.Limits(**limits))
        return AnswerDesk(self.provider, service, client, limiter, self._engine, self.env)

    def _engine(self, url: str, grace_seconds: float = 0.0):
        """The engine of a database, waiting ``grace_seconds`` for a server that went away (unchecked: the
        first statement rides out an outage instead of failing the engine)."""
        with self._engine_lock:
            if (url, grace_seconds) not in self.engines:
                self.engines[url, grace_seconds] = make_engine(url, check=False, retry_seconds=grace_seconds)
            return self.engines[url, grace_seconds]


class ServiceHandle:
    """What a runner holds: the provider's actor and the service (endpoint, limits) its queries go to."""

    def __init__(self, actor, endpoint: str | None, service: str, limits: dict, grace_seconds: float = 0.0):
        self.actor, self.endpoint, self.service, self.limits = actor, endpoint, service, limits
        self.grace_seconds = grace_seconds

    def query(self, database_url: str, job_id: int, digest: str, image: bytes):
        return self.actor.query.remote(self.endpoint, self.service, self.limits, database_url, job_id, digest, image,
                                       self.grace_seconds)


def actor_options(provider: str, resources: dict | None = None) -> dict:
    """Ray options of ``provider``'s actor: named and detached (one per provider on the cluster), with the custom
    ``resources`` its first job asks for (``{"dsq_api": 1}`` on a cluster with api nodes; a running actor keeps
    where it was placed)."""
    return {"name": f"dsq-api-{provider}", "lifetime": "detached", "get_if_exists": True,
            **({"resources": dict(resources)} if resources else {})}


def connect(provider: str, endpoint: str | None, service: str, limits: ratelimit.Limits,
            grace_seconds: float = 0.0, resources: dict | None = None) -> ServiceHandle:
    """The cluster's actor for ``provider`` (started if needed), its desk for ``service`` set to ``limits``."""
    actor = ApiActor.options(**actor_options(provider, resources)).remote(provider)
    problem = ray.get(actor.configure.remote(endpoint, service, dataclasses.asdict(limits)))
    if problem is not None:
        raise MissingCredentials(problem) if "credentials" in problem else DsqError(problem)
    return ServiceHandle(actor, endpoint, service, dataclasses.asdict(limits), grace_seconds)
