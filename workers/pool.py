"""ActorPool: the actor processes (samplers, trainers) a worker keeps from one job to the next."""

from __future__ import annotations

import threading

import ray


class ActorPool:
    """Idle actors kept between jobs, keyed by what their processes are (kind, device, threads, Ray resources).

    A job takes idle actors of its key instead of starting new processes: a process start and ``import torch`` cost
    seconds, and what a job loads (its models) the actors load per call (``SamplerActor``) or per job
    (``TrainerActor``). Idle actors of other keys are ended before new ones start when the cluster has no room for
    the new ones beside them, so that idle actors never hold the CPUs (or GPUs) that a running job needs.
    """

    def __init__(self):
        self.idle: dict[tuple, list] = {}
        self.lock = threading.Lock()

    def acquire(self, key, count: int, start, needs: dict | None = None) -> list:
        """``count`` actors of ``key``: idle ones first, the rest from ``start()``; ``needs``: the Ray resources one
        new actor takes (its options), to tell whether it fits beside the idle actors of other keys."""
        with self.lock:
            mine = self.idle.pop(key, [])
            reused, spare = mine[:count], mine[count:]
            missing = count - len(reused)
            if missing and self.idle and not _room(needs, missing):
                self._end([actor for actors in self.idle.values() for actor in actors])
                self.idle.clear()
            if spare:
                self.idle[key] = spare
        return reused + [start() for _ in range(missing)]

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


def _room(needs: dict | None, count: int) -> bool:
    """Whether ``count`` actors taking ``needs`` each fit in what the cluster has free now (unknown: no)."""
    if needs is None:
        return False
    free = ray.available_resources()
    wanted = {"CPU": needs.get("num_cpus", 1), "GPU": needs.get("num_gpus", 0), **needs.get("resources", {})}
    return all(free.get(name, 0.0) + 1e-9 >= amount * count for name, amount in wanted.items() if amount)
