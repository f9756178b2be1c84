"""Answer one encoded image exactly once: the cache, in-flight de-duplication, the query, the store.

``AnswerDesk.answer`` is what an API actor runs for each query. The database is the cache: an answer
stored by anyone (this job, an earlier run, another job) is returned without a query; two requests for
the same bytes at the same time wait for one query; a query is paid (stored with the paying job) before
its reply leaves. Retries re-send the same bytes (``ratelimit.Limiter``).

A paid answer is kept in memory before anything else can fail, and the write is retried while the
database is away (``grace_seconds``, the caller's ``DSQ_DB_GRACE_SECONDS``): an answer the vendor
gave is stored once the database is back, and never asked for again, even when the write gave up
(the next request for the same bytes, from any job, stores and returns the kept answer). Replies are
plain dicts:

- ``{"sha256", "top_label", "paid": bool}``            answered (``paid``: this call paid for it)
- ``{"sha256", "error": str, "fatal": True}``          the service refused the image (a bad image)
- ``{"sha256", "error": str, "fatal": False}``         every retry failed (the job should stop)
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Mapping

from sqlalchemy import Engine

from dsq.apis import labels, providers, ratelimit
from dsq.db import repo
from dsq.db.session import riding_out, session_scope


@dataclass(frozen=True)
class Kept:
    """An answer paid for and not yet stored: what to store, and the job that paid."""

    raw: dict
    label: str
    job_id: int


class AnswerDesk:
    """One provider's client and limiter, answering queries for any job and database.

    ``engine_for(database_url, grace_seconds)`` gives the engine of a database (one that waits for a
    server that went away).
    """

    def __init__(self, provider: str, service: str, client, limiter: ratelimit.Limiter,
                 engine_for: Callable[[str, float], Engine], env: Mapping[str, str]):
        self.provider, self.service, self.client, self.limiter = provider, service, client, limiter
        self.engine_for, self.env = engine_for, env
        self._lock = threading.Lock()
        self._in_flight: dict[tuple[str, str], threading.Event] = {}  # (database, digest): one asker at a time
        self._kept: dict[tuple[str, str], Kept] = {}  # (database, digest): paid, not yet stored
        self.queries = self.cached = 0

    def answer(self, database_url: str, job_id: int, digest: str, image: bytes, grace_seconds: float = 0.0) -> dict:
        engine = self.engine_for(database_url, grace_seconds)
        key = (database_url, digest)
        while True:  # one request per digest looks at the cache and queries; the others wait for it, then look
            with self._lock:
                waiting = self._in_flight.get(key)
                if waiting is None:
                    self._in_flight[key] = threading.Event()
                    break
            waiting.wait()
        try:
            kept = self._kept.get(key)
            if kept is not None:  # paid earlier, the database was away: store it now, never ask again
                self.cached += 1
                return self._store(engine, key, kept, job_id, grace_seconds)
            stored = riding_out(lambda: self._stored(engine, digest), grace_seconds)
            if stored is not None:
                self.cached += 1
                return {"sha256": digest, "top_label": stored, "paid": False}
            return self._query(engine, key, job_id, image, grace_seconds)
        finally:
            with self._lock:
                self._in_flight.pop(key).set()

    def kept(self) -> int:
        """How many paid answers wait for their database."""
        return len(self._kept)

    def _stored(self, engine: Engine, digest: str) -> str | None:
        with session_scope(engine) as session:
            row = repo.api_answers(session, self.provider, self.service, [digest]).get(digest)
            return row.top_label if row is not None else None

    def _query(self, engine: Engine, key: tuple[str, str], job_id: int, image: bytes, grace_seconds: float) -> dict:
        digest = key[1]
        try:
            raw = self.limiter.call(lambda: self.client.detect(image), self.client.classify)
        except ratelimit.QueryRefused as error:
            return {"sha256": digest, "error": providers.scrub(str(error), self.env), "fatal": True}
        except ratelimit.RetriesExhausted as error:
            return {"sha256": digest, "error": providers.scrub(str(error), self.env), "fatal": False}
        kept = self._kept[key] = Kept(raw, labels.top_label(providers.labels(self.provider, raw)), job_id)
        self.queries += 1
        return self._store(engine, key, kept, job_id, grace_seconds)

    def _store(self, engine: Engine, key: tuple[str, str], kept: Kept, job_id: int, grace_seconds: float) -> dict:
        """Store a kept answer (for the job that paid it), riding out an outage; it stays kept if that fails."""
        def store() -> bool:
            with session_scope(engine) as session:
                return repo.store_api_answer(session, provider=self.provider, service=self.service, sha256=key[1],
                                             answer=kept.raw, top_label=kept.label, job_id=kept.job_id)

        first = riding_out(store, grace_seconds)
        del self._kept[key]
        return {"sha256": key[1], "top_label": kept.label, "paid": first and kept.job_id == job_id}

    def stats(self) -> dict:
        return {"queries": self.queries, "cached": self.cached, "retries": dict(self.limiter.retries),
                "peak_concurrency": self.limiter.cap.peak, "kept": self.kept()}
