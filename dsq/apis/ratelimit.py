"""Rate limits, concurrency caps and retries for vision-API queries (thread-safe, clock injected).

- ``TokenBucket``      qps tokens per second, at most ``burst`` saved up; ``reserve()`` says how long
                       to wait for the next token (reservations queue up fairly)
- ``ConcurrencyCap``   at most ``limit`` queries in flight; the limit can change while in use
- ``Limiter.call``     send one query under both, retrying throttling and transient errors with
                       exponential backoff and full jitter, honouring Retry-After; the same ``send``
                       (so the same bytes) is called again, never a new sample
- ``Decision``         how a provider classifies a failure: ``throttle``, ``transient`` or ``fatal``

Default limits follow the vendors' documented default quotas (change them per job with
``--qps/--burst/--concurrency``):

- aws       Rekognition DetectLabels: default TPS quota 5 in most regions (50 in a few large ones)
- google    Cloud Vision: 1,800 label-detection requests per minute per project (30 per second)
- azure     AI Vision Image Analysis, S1 tier: 10 transactions per second (F0: 20 per minute)
- clarifai  a conservative 10 requests per second per app
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple, TypeVar

from dsq.errors import ApiQueryFailed
from dsq.errors import InvalidArgument

T = TypeVar("T")
THROTTLE, TRANSIENT, FATAL = "throttle", "transient", "fatal"
# Threads of one API actor: each waits on one query in flight; 64 saturates every vendor's default quota
# (DEFAULT_LIMITS) with room for slow answers, and keeps the actor's threads and connections bounded.
MAX_CONCURRENCY = 64


@dataclass(frozen=True)
class Limits:
    qps: float
    burst: int
    concurrency: int


DEFAULT_LIMITS = {
    "aws": Limits(qps=5.0, burst=5, concurrency=5),
    "google": Limits(qps=30.0, burst=30, concurrency=16),
    "azure": Limits(qps=10.0, burst=10, concurrency=10),
    "clarifai": Limits(qps=10.0, burst=10, concurrency=8),
}


def limits_for(provider: str, qps: float | None = None, burst: int | None = None,
               concurrency: int | None = None) -> Limits:
    """The provider's defaults with the given overrides (a qps override alone sets burst to match)."""
    default = DEFAULT_LIMITS[provider]
    rate = float(qps) if qps is not None else default.qps
    return Limits(qps=rate, burst=burst if burst is not None else (max(1, round(rate)) if qps else default.burst),
                  concurrency=concurrency if concurrency is not None else default.concurrency)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 12
    base: float = 0.2
    cap: float = 20.0

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        """Full jitter over base * 2^attempt (capped), never shorter than the server's Retry-After."""
        jitter = rng.uniform(0, min(self.cap, self.base * 2 ** attempt))
        return max(jitter, retry_after or 0.0)


class Decision(NamedTuple):
    kind: str
    message: str
    retry_after: float | None = None


class QueryRefused(ApiQueryFailed):
    """The service refused this query for good (bad image, bad request): retrying will not help."""


class RetriesExhausted(ApiQueryFailed):
    """Every attempt was throttled or failed transiently."""


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` held; reservations may run into debt (a queue)."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self._lock = threading.Lock()
        self._clock = clock
        self.set_rate(rate, burst)
        self._tokens, self._stamp = float(burst), clock()

    def set_rate(self, rate: float, burst: int) -> None:
        if not rate > 0 or burst < 1:
            raise InvalidArgument(f"a token bucket needs rate > 0 and burst >= 1, got {rate!r}, {burst!r}")
        with self._lock:
            self.rate, self.burst = float(rate), int(burst)

    def reserve(self) -> float:
        """Take one token; return the seconds to wait before using it (0 when one was there)."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= 1
            return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


class ConcurrencyCap:
    """A semaphore whose limit can be changed while queries are in flight."""

    def __init__(self, limit: int):
        self._condition = threading.Condition()
        self.limit, self.active, self.peak = int(limit), 0, 0

    def set_limit(self, limit: int) -> None:
        with self._condition:
            self.limit = int(limit)
            self._condition.notify_all()

    def __enter__(self):
        with self._condition:
            self._condition.wait_for(lambda: self.active < self.limit)
            self.active += 1
            self.peak = max(self.peak, self.active)
        return self

    def __exit__(self, *exc):
        with self._condition:
            self.active -= 1
            self._condition.notify()


class Limiter:
    """One provider's bucket, cap and retry policy; ``call`` sends one query through them."""

    def __init__(self, limits: Limits, policy: RetryPolicy = RetryPolicy(), *,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 rng: random.Random | None = None):
        self.bucket = TokenBucket(limits.qps, limits.burst, clock)
        self.cap = ConcurrencyCap(limits.concurrency)
        self.policy, self.sleep = policy, sleep
        self.rng = rng or random.Random()
        self.retries = {THROTTLE: 0, TRANSIENT: 0}

    def configure(self, limits: Limits) -> None:
        self.bucket.set_rate(limits.qps, limits.burst)
        self.cap.set_limit(limits.concurrency)

    def call(self, send: Callable[[], T], classify: Callable[[BaseException], Decision]) -> T:
        """``send()`` until it answers; raise QueryRefused (fatal) or RetriesExhausted."""
        decision = None
        for attempt in range(self.policy.max_attempts):
            wait = self.bucket.reserve()
            if wait > 0:
                self.sleep(wait)
            with self.cap:
                try:
                    return send()
                except Exception as error:  # noqa: BLE001 - classified right below
                    decision = classify(error)
            if decision.kind == FATAL:
                raise QueryRefused(decision.message)
            self.retries[decision.kind] += 1
            self.sleep(self.policy.delay(attempt, decision.retry_after, self.rng))
        raise RetriesExhausted(f"gave up after {self.policy.max_attempts} attempts: {decision.message}")


def parse_retry_after(value) -> float | None:
    """Seconds from a Retry-After header value (delta-seconds; an HTTP date counts as unknown)."""
    if value is None:
        return None
    try:
        return max(0.0, float(str(value).strip()))
    except ValueError:
        return None
