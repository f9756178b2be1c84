"""What every emulator server shares: its configuration, the labelling service behind the wire protocol, the
ledger of what was answered, and the replies that signal throttling or failure."""

from __future__ import annotations

import collections
import hashlib
import io
import random
import threading
import time
from dataclasses import dataclass, replace

from PIL import Image

from dsq.checks import first_line

PROTOCOLS = ("aws", "google", "azure", "clarifai")
THROTTLED, FAILED = "throttled", "failed"


@dataclass(frozen=True)
class EmulatorConfig:
    throttle: float = 0.0        # fraction of requests refused as throttled
    errors: float = 0.0          # fraction of requests failing with a transient server error
    latency: float = 0.0         # seconds added to every request
    retry_after: float | None = None  # Retry-After (seconds) sent with a throttled HTTP answer
    min_confidence: float = 0.3  # labels below it are left out (an empty answer is possible)
    seed: int = 0


class BadImage(Exception):
    """The request's bytes are not an image."""


class Ledger:
    """Thread-safe counts of requests, throttled and failed ones, and answers per image hash."""

    def __init__(self):
        self._lock = threading.Lock()
        self.answered: collections.Counter = collections.Counter()
        self.requests = self.throttled = self.failed = self.bad_images = 0
        self.credentials: set[str] = set()  # sha256 of the credentials clients sent (never the values)

    def count(self, what: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, what, getattr(self, what) + n)

    def saw_credential(self, credential: str | None) -> None:
        if credential:
            with self._lock:
                self.credentials.add(hashlib.sha256(credential.encode()).hexdigest())

    def answer(self, digest: str) -> None:
        with self._lock:
            self.answered[digest] += 1

    @property
    def billed(self) -> int:
        with self._lock:
            return sum(self.answered.values())

    def snapshot(self) -> dict:
        with self._lock:
            return {"requests": self.requests, "throttled": self.throttled, "failed": self.failed,
                    "bad_images": self.bad_images, "billed": sum(self.answered.values()),
                    "answered": dict(self.answered)}


class Service:
    """What every protocol shares: fault injection, labelling, the ledger."""

    def __init__(self, labeller, config: EmulatorConfig = EmulatorConfig()):
        self.labeller, self.ledger = labeller, Ledger()
        self.configure(config)

    def configure(self, config: EmulatorConfig | None = None, **changes) -> None:
        """Change the injected faults while serving (``configure(throttle=0.3)``)."""
        self.config = replace(config or getattr(self, "config", EmulatorConfig()), **changes)
        self._rng = random.Random(self.config.seed)
        self._rng_lock = threading.Lock()

    def gate(self, credential: str | None) -> str | None:
        """Once per request (with the credential it carried): None to serve it, or THROTTLED / FAILED."""
        self.ledger.count("requests")
        self.ledger.saw_credential(credential)
        if self.config.latency:
            time.sleep(self.config.latency)
        with self._rng_lock:
            roll = self._rng.random()
        if roll < self.config.throttle:
            self.ledger.count("throttled")
            return THROTTLED
        if roll < self.config.throttle + self.config.errors:
            self.ledger.count("failed")
            return FAILED
        return None

    def label(self, data: bytes) -> list[tuple[str, float]]:
        """The labeller's labels (confidence in [0, 1], most confident first); BadImage if unreadable."""
        try:
            with Image.open(io.BytesIO(data)) as picture:
                picture.load()
                labels = self.labeller(picture)
        except Exception as error:  # noqa: BLE001 - anything unreadable is a bad image to the client
            self.ledger.count("bad_images")
            raise BadImage(first_line(error) or "not an image") from None
        self.ledger.answer(hashlib.sha256(data).hexdigest())
        kept = [(name, conf) for name, conf in labels if conf >= self.config.min_confidence]
        return sorted(kept, key=lambda item: (-item[1], item[0]))
