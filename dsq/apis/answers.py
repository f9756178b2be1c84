"""Answer one encoded image exactly once: the cache, in-flight de-duplication, the query, the store.

``AnswerDesk.answer`` is what an API actor runs for each query. The database is the cache: an answer
stored by anyone (this job, an earlier run, another job) is returned without a query; two requests for
the same bytes at the same time wait for one query; a query is paid (stored with the paying job) before
its reply leaves. Retries re-send the same bytes (``ratelimit.Limiter``). Replies are plain dicts:

- ``{"sha256", "top_label", "paid": bool}``            answered (``paid``: this call paid for it)
- ``{"sha256", "error": str, "fatal": True}``          the service refused the image (a bad image)
- ``{"sha256", "error": str, "fatal": False}``         every retry failed (the job should stop)
"""

from __future__ import annotations

import threading
from typing import Callable, Mapping

from sqlalchemy import Engine

from dsq.apis import labels, providers, ratelimit
from dsq.db import repo
from dsq.db.session import session_scope


class AnswerDesk:
    """One provider's client and limiter, answering queries for any job and database."""

    def __init__(self, provider: str, service: str, client, limiter: ratelimit.Limiter,
                 engine_for: Callable[[str], Engine], env: Mapping[str, str]):
        self.provider, self.service, self.client, self.limiter = provider, service, client, limiter
        self.engine_for, self.env = engine_for, env
        self._lock = threading.Lock()
        self._in_flight: dict[str, threading.Event] = {}
        self.queries = self.cached = 0

    def answer(self, database_url: str, job_id: int, digest: str, image: bytes) -> dict:
        engine = self.engine_for(database_url)
        while True:
            stored = self._stored(engine, digest)
            if stored is not None:
                self.cached += 1
                return {"sha256": digest, "top_label": stored, "paid": False}
            with self._lock:
                waiting = self._in_flight.get(digest)
                if waiting is None:
                    self._in_flight[digest] = threading.Event()
                    break
            waiting.wait()
        try:
            return self._query(engine, job_id, digest, image)
        finally:
            with self._lock:
                self._in_flight.pop(digest).set()

    def _stored(self, engine: Engine, digest: str) -> str | None:
        with session_scope(engine) as session:
            row = repo.api_answers(session, self.provider, self.service, [digest]).get(digest)
            return row.top_label if row is not None else None

    def _query(self, engine: Engine, job_id: int, digest: str, image: bytes) -> dict:
        try:
            raw = self.limiter.call(lambda: self.client.detect(image), self.client.classify)
        except ratelimit.QueryRefused as error:
            return {"sha256": digest, "error": providers.scrub(str(error), self.env), "fatal": True}
        except ratelimit.RetriesExhausted as error:
            return {"sha256": digest, "error": providers.scrub(str(error), self.env), "fatal": False}
        self.queries += 1
        label = labels.top_label(providers.labels(self.provider, raw))
        with session_scope(engine) as session:
            paid = repo.store_api_answer(session, provider=self.provider, service=self.service, sha256=digest,
                                         answer=raw, top_label=label, job_id=job_id)
        return {"sha256": digest, "top_label": label, "paid": paid}

    def stats(self) -> dict:
        return {"queries": self.queries, "cached": self.cached, "retries": dict(self.limiter.retries),
                "peak_concurrency": self.limiter.cap.peak}
