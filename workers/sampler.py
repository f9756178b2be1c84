"""SamplerActor: a sampling process that holds the f o D its calls ask for and turns shards of samples into votes."""

from __future__ import annotations

import json
import os
import socket
import time

import ray
import torch

from dsq import fastpath, pipeline, previews, sampling, sizing


@ray.remote(max_restarts=3, max_task_retries=3)
class SamplerActor:
    """One sampling process (torch imported, threads set), kept by a worker from job to job.

    Every call names the pipeline it is for (``model``: the sources of f and D, the precision, compile); the actor
    loads it on the first call that asks for it and keeps it until a call asks for another. A restarted actor, or one
    handed to a job with other models, therefore never samples with the wrong f o D.
    """

    def __init__(self, settings, threads: int, device: str = "cpu"):
        torch.set_num_threads(threads)
        if device == "cpu":
            fastpath.tune_cpu_allocator()  # this process only samples: keep activation buffers resident
        self.settings, self.device = settings, device
        self.held, self.model, self.channels, self.denoised = None, None, None, False
        self.name = f"{socket.gethostname()}:{ray.get_runtime_context().get_actor_id()[:8]}"

    def _use(self, model: dict) -> None:
        # the files' size and mtime are read here, on the node that loads them: a file changed since the last
        # load is loaded again, and its pinned hash checked again
        key = (source_key(model["classifier"]), source_key(model["denoiser"]), model["precision"], model["compile"])
        if key == self.held:
            return
        self.held, self.model = None, None  # the old pipeline goes before the new one loads (GPU memory)
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        # Prepared once per load (BN folded, channels-last where it helps). fp32 leaves f unchanged;
        # bf16/fp16 autocast changes it, so the runner records the precision with every result.
        chain = pipeline.load(model["classifier"], model["denoiser"], self.device, self.settings)
        self.channels = sampling.input_channels(chain)
        self.model = fastpath.prepare_for_inference(chain, device=self.device, precision=model["precision"],
                                                    compile=model["compile"])
        self.held, self.denoised = key, model["denoiser"] is not None

    def counts(self, x, *, model, sigma, start, count, batch_size, seed, image, phase) -> dict:
        self._use(model)
        started = time.perf_counter()
        counts = sampling.sample_counts(self.model, x, sigma=sigma, start=start, count=count,
                                        batch_size=batch_size, seed=seed, image=image, phase=phase,
                                        device=self.device)
        return {"counts": counts, "seconds": time.perf_counter() - started,
                "worker": self.name, "device": self.device}

    def preview(self, model, x, *, sigma, seed, image, count) -> dict:
        """One image's preview (``dsq.previews``): the PNG and f o D's class on each of ``count`` samples."""
        self._use(model)
        denoise = self.model.net[:-1] if self.denoised else None  # D, and a resize if the chain has one
        png, classes = previews.make(self.model, denoise, x, sigma=sigma, seed=seed, image=image, count=count)
        return {"png": png, "classes": classes}

    def notes(self, model, x) -> list[str]:
        """What the job's log says of f o D on images like ``x`` (``pipeline.notes``)."""
        self._use(model)
        return pipeline.notes(self.model.net, x)

    def input_channels(self, model) -> int | None:
        """The channels of the images f o D takes: the runner converts the dataset's images to them."""
        self._use(model)
        return self.channels

    def memory_probe(self, model, x, share: float) -> dict:
        """What one sample costs on this actor's device and what a batch may take (``dsq.sizing``)."""
        self._use(model)
        return {**sizing.probe(self.model, x, self.device, share), "model": self.model.describe(),
                "device": self.device}


def source_key(source: dict | None) -> tuple | None:
    """A model source as a pool key: a stored checkpoint's or an upload's sha256; a local file's path, size and
    mtime."""
    if source is None:
        return None
    carried = source.get("uploads") or {}  # read from the store: their sha256 says what they are
    files = [path for path in (source["location"] if source["sha256"] is None else None,
                               source["options"].get("weights")) if path and path not in carried]
    stats = [(path, os.stat(path).st_size, os.stat(path).st_mtime_ns) for path in files]
    return (source["reference"], source["sha256"], json.dumps(source["options"], sort_keys=True), source.get("sigma"),
            *stats, *sorted((path, entry["sha256"]) for path, entry in carried.items()))
