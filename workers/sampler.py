"""SamplerActor: holds f o D once and turns shards of samples into vote counts."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import ray
import torch

from dsq import fastpath, pipeline, previews, sampling, sizing


@ray.remote(max_restarts=3, max_task_retries=3)
class SamplerActor:
    """Loads the pipeline from its checkpoints once; each call is one shard."""

    def __init__(self, settings, classifier_source, denoiser_source, threads: int, device: str = "cpu",
                 precision: str = "fp32", compile: bool = False):  # noqa: A002
        torch.set_num_threads(threads)
        if device == "cpu":
            fastpath.tune_cpu_allocator()  # this process only samples: keep activation buffers resident
        self.device = device
        self.denoised = denoiser_source is not None
        # Prepared once per actor (BN folded, channels-last where it helps). fp32 leaves f unchanged;
        # bf16/fp16 autocast changes it, so the runner records the precision with every result.
        chain = pipeline.load(classifier_source, denoiser_source, device, settings)
        self.channels = sampling.input_channels(chain)
        self.model = fastpath.prepare_for_inference(chain, device=device, precision=precision, compile=compile)
        self.name = f"{socket.gethostname()}:{ray.get_runtime_context().get_actor_id()[:8]}"

    def counts(self, x, *, sigma, start, count, batch_size, seed, image, phase) -> dict:
        started = time.perf_counter()
        counts = sampling.sample_counts(self.model, x, sigma=sigma, start=start, count=count,
                                        batch_size=batch_size, seed=seed, image=image, phase=phase,
                                        device=self.device)
        return {"counts": counts, "seconds": time.perf_counter() - started,
                "worker": self.name, "device": self.device}

    def preview(self, x, *, sigma, seed, image, count) -> dict:
        """One image's preview (``dsq.previews``): the PNG and f o D's class on each of ``count`` samples."""
        denoise = self.model.net[:-1] if self.denoised else None  # D, and a resize if the chain has one
        png, classes = previews.make(self.model, denoise, x, sigma=sigma, seed=seed, image=image, count=count)
        return {"png": png, "classes": classes}

    def notes(self, x) -> list[str]:
        """What the job's log says of f o D on images like ``x`` (``pipeline.notes``)."""
        return pipeline.notes(self.model.net, x)

    def input_channels(self) -> int | None:
        """The channels of the images f o D takes: the runner converts the dataset's images to them."""
        return self.channels

    def memory_probe(self, x, share: float) -> dict:
        """What one sample costs on this actor's device and what a batch may take (``dsq.sizing``)."""
        return {**sizing.probe(self.model, x, self.device, share), "model": self.model.describe(),
                "device": self.device}


class SamplerPool:
    """Sampler actors kept between jobs by a worker, keyed by what they hold (models, device, threads...).

    A job that needs the same f o D as one before it reuses that job's actors instead of starting
    processes and loading models again. Starting new actors first ends the idle ones of other keys,
    so idle actors never hold the CPUs (or memory) that new ones need.
    """

    def __init__(self):
        self.idle: dict[tuple, list] = {}
        self.lock = threading.Lock()

    def acquire(self, key: tuple, count: int, start) -> list:
        with self.lock:
            mine = self.idle.pop(key, [])
            reused, spare = mine[:count], mine[count:]
            if len(reused) < count:  # new actors start: idle ones of other keys end first
                self._end([actor for actors in self.idle.values() for actor in actors])
                self.idle.clear()
            if spare:
                self.idle[key] = spare
        return reused + [start() for _ in range(count - len(reused))]

    def release(self, key: tuple, actors: list, healthy: bool) -> None:
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


def source_key(source: dict | None) -> tuple | None:
    """A model source as a pool key: a stored checkpoint's sha256; a local file's path, size and mtime."""
    if source is None:
        return None
    files = [path for path in (source["location"] if source["sha256"] is None else None,
                               source["options"].get("weights")) if path]
    stats = [(path, os.stat(path).st_size, os.stat(path).st_mtime_ns) for path in files]
    return (source["reference"], source["sha256"], json.dumps(source["options"], sort_keys=True), source.get("sigma"),
            *stats)
