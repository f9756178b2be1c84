"""ActorPool: the actor processes (samplers, trainers) a worker keeps from one job to the next."""

from __future__ import annotations

import threading

import ray


class ActorPool:
    """Idle actors kept between jobs, keyed by what their processes are (kind, settings, device, threads, Ray
    resources).

    A job takes idle actors of its key instead of starting new processes: a process start and ``import torch`` cost
    seconds, and what a job loads (its models) the actors load per call (``SamplerActor``) or per job
    (``TrainerActor``). Idle actors of other keys end when a job takes its actors, so that while jobs run no idle
    actor holds a CPU (or GPU) that they need, for new actors or for actors Ray restarts after losing a node.
    """

    def __init__(self):
        self.idle: dict[tuple, list] = {}
        self.lock = threading.Lock()

    def acquire(self, key, count: int, start) -> list:
        """``count`` actors of ``key``: idle ones first, the rest from ``start()``."""
        with self.lock:
            mine = self.idle.pop(key, [])
            reused, spare = mine[:count], mine[count:]
            self._end([actor for actors in self.idle.values() for actor in actors])
            self.idle.clear()
            if spare:
                self.idle[key] = spare
        return reused + [start() for _ in range(count - len(reused))]

    def release(self, key, actors: list, healthy: bool) -> None:
        """Actors back after a job: kept when the job ended well, else ended (their state is unknown)."""
        if not healthy:
            self._end(actors)
            return
        with self.lock:
            self.idle.setdefault(key, []).extend(actors)

    def close(self) -> None:
        with self.lock:
            self._end([actor for actors in self.idle.values() for actor in actors])
            self.idle.clear()

    @staticmethod
    def _end(actors: list) -> None:
        for actor in actors:
            ray.kill(actor)
