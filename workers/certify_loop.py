"""Run a certify job: stream shards of each image's samples over sampler actors, store each image once complete.

Fixed n: each phase of an image is cut into a shard per actor; the image is certified once all are in.
Sequential (a target radius): the selection shards as with a fixed n, then estimation batches, one
batch per task, decided in batch order (``dsq.sequential.Stream``) until the test stops.
PREDICT: one phase of n samples, cut into a shard per actor, then Cohen et al.'s binomial test.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
import ray

from dsq import bounds, pipeline, previews, references, sampling, sequential, sizing, smoothing, specs, uploads
from dsq.db import repo
from dsq.db.session import session_scope
from dsq.kinds import certify
from dsq.settings import Settings
from workers import resources
from workers.loop import POLL_SECONDS, Control, JobLoop, settle
from workers.pool import ActorPool
from workers.sampler import SamplerActor

# Shards in flight per sampler actor: one running and one waiting, so an actor never idles between a reply and
# the next request, while a lost actor takes at most two shards with it.
TASKS_PER_ACTOR = 2
SHARD_RETRY_SECONDS = 180.0  # how long a shard lost with its actor is tried again while Ray restarts the actor


@dataclass
class ImageState:
    index: int
    label: int | None
    x: object
    shards_left: int
    started: float = field(default_factory=time.perf_counter)
    counts: dict = field(default_factory=lambda: collections.defaultdict(list))
    workers: set = field(default_factory=set)
    stream: sequential.Stream | None = None  # sequential: the estimation batches, once cA is known
    sent: int = 0  # sequential: estimation batches sent so far (batches 0 .. sent - 1)
    out: set = field(default_factory=set)  # sequential: estimation batches sent (or queued again), not back


def model_sources(session, spec) -> list:
    """f's and D's sources (``references.source``): each sampler fetches (and hash-checks) them on its own node."""
    return [references.source(session, spec.classifier, spec.models.get(spec.classifier), uploads=spec.uploads),
            references.source(session, spec.denoiser, spec.models.get(spec.denoiser), spec.sigma, spec.uploads)
            if spec.denoiser else None]


def run(engine, settings: Settings, job_id: int, spec, control: Control) -> None:
    with session_scope(engine) as session:
        sources = model_sources(session, spec)
        done = repo.done_image_indices(session, job_id)
    data = uploads.data_spec(settings, spec)  # the store's copies of its folders and files, where it uploaded them
    root = settings.data_root_of(data)
    plan = pipeline.image_plan(spec, pipeline.images(data, root))
    todo = collections.deque(i for i in plan if i not in done)
    if not todo:  # a job resumed after its last image: its previews were made when it started
        return
    cluster = resources.sized_for(control)
    workers = spec.workers or specs.default_workers(cluster)
    options, threads = resources.actor_options(workers, cluster)
    device = resources.device_for("num_gpus" in options)
    def start():  # spread over the nodes: shards run in parallel, and losing one node costs one sampler
        return SamplerActor.options(**options, scheduling_strategy="SPREAD").remote(settings, threads, device)

    model = sampler_model(sources, spec)
    pool = control.pool or ActorPool()
    key = sampler_key(settings, threads, device, options)
    actors = pool.acquire(key, workers, start)
    loop, healthy = None, False
    try:
        dataset, note = pipeline.job_dataset(data, root, ray.get(actors[0].input_channels.remote(model)))
        # Said in the job's log: images converted to the channels f o D takes, a diffusion denoiser's timestep...
        lines = [note] if note else []
        lines += ray.get(actors[0].notes.remote(model, dataset[todo[0]][0]))
        if lines:
            with session_scope(engine) as session:
                for line in lines:
                    repo.add_log(session, job_id, line)
        probe = ray.get(actors[0].memory_probe.remote(model, dataset[todo[0]][0], options.get("num_gpus", 1.0)))
        spec = _size_job(engine, job_id, spec, workers, threads, probe)
        store_previews(engine, job_id, spec, dataset, actors, model, plan[:spec.previews])
        kind = SequentialLoop if spec.sequential else PredictLoop if spec.predict else CertifyLoop
        loop = kind(engine, job_id, control, spec, dataset, actors, len(plan) - len(todo), len(plan),
                    model=probe["model"], sources=model)
        loop.run(todo)
        healthy = True
    finally:
        settle(loop.in_flight if loop else {})  # a shard killed mid-task makes Ray print its own failure
        pool.release(key, actors, healthy and control.pool is not None)


def sampler_model(sources: list, spec) -> dict:
    """What every call to a sampler names: the actors load it once, whatever they held before (``SamplerActor``)."""
    return {"classifier": sources[0], "denoiser": sources[1], "precision": spec.precision, "compile": spec.compile}


def sampler_key(settings: Settings, threads: int, device: str, options: dict) -> tuple:
    """Samplers that one job can hand to the next (``ActorPool``); settings: where their models come from."""
    return "sampler", settings, threads, device, tuple(sorted(options.items()))


def store_previews(engine, job_id: int, spec, dataset, actors: list, model: dict, indices) -> None:
    """The previews of ``indices`` not stored yet (``dsq.previews``), spread over the actors. Their noise is a
    stream of their own and the actors hold no state, so no count changes."""
    with session_scope(engine) as session:
        stored = repo.previewed_indices(session, job_id)
    asked = {actors[k % len(actors)].preview.remote(model, dataset[index][0], sigma=spec.sigma, seed=spec.seed,
                                                    image=index, count=previews.SAMPLES): index
             for k, index in enumerate(i for i in indices if i not in stored)}
    for ref, index in asked.items():
        try:
            reply = ray.get(ref)
        except ray.exceptions.RayActorError as lost:  # a preview is not worth a job's attempt: said, and skipped
            with session_scope(engine) as session:
                repo.add_log(session, job_id, f"image {index}: its preview lost its sampler ({type(lost).__name__}); "
                                              f"dsq preview {job_id} {index} asks for it again", level="warning")
            continue
        with session_scope(engine) as session:
            repo.upsert_preview(session, job_id, index, png=reply["png"], classes=reply["classes"])


def _size_job(engine, job_id: int, spec, workers: int, threads: int, probe: dict):
    """Fix an automatic batch size in the job's spec (it shapes the noise); log the sizing either way.

    A batch from the spec far below what dsq would choose here is logged as a warning, not silently used.
    """
    automatic = sizing.choose_batch(probe["bytes_per_sample"], probe["budget_bytes"], n=spec.most_n, workers=workers)
    if spec.sequential:
        automatic = sizing.sequential_batch(automatic, spec.max_n)
    how = "chosen" if spec.batch_size is None else f"from the spec; automatic here: {automatic}"
    small = spec.batch_size is not None and spec.batch_size * 4 <= automatic
    with session_scope(engine) as session:
        if spec.batch_size is None:
            spec = dataclasses.replace(spec, batch_size=automatic)
            repo.set_spec(session, job_id, spec.to_dict())
        repo.add_log(session, job_id, (
            f"{workers} sampler actor(s) x {threads} thread(s) on {probe['device']}, {probe['model']['precision']}; "
            f"batch {spec.batch_size} ({how}; {probe['bytes_per_sample'] / 1024:.0f} KiB per sample, "
            f"budget {probe['budget_bytes'] / 2**20:.0f} MiB)"
            + (f"; sequential at radius {spec.radius:g}: a look every batch, at most {spec.max_n} samples"
               if spec.sequential else "")), level="warning" if small else "info")
    return spec


class CertifyLoop(JobLoop):
    """Streams shards of several images over the actors and stores each image once complete."""

    def __init__(self, engine, job_id, control, spec, dataset, actors, done, total, model: dict | None = None,
                 sources: dict | None = None):
        super().__init__(engine, job_id, control, done=done, total=total)
        self.spec, self.dataset, self.actors, self.model = spec, dataset, actors, model
        self.sources = sources  # the f o D each call asks the samplers for (``SamplerActor``)
        self.queue: collections.deque = collections.deque()
        self.load = [0] * len(actors)
        self.images: dict[int, ImageState] = {}

    def run(self, todo: collections.deque) -> None:
        while todo or self.queue or self.in_flight:
            while todo and len(self.queue) < TASKS_PER_ACTOR * len(self.actors):
                self._open(todo.popleft())
            self._dispatch()
            for ref in self.ready():
                self._collect(ref)

    def _open(self, index: int) -> None:
        x, label = self.dataset[index]
        shards = self._shards()
        label = None if label is None else int(label)  # input files have no label
        self.images[index] = ImageState(index, label, ray.put(x), len(shards))
        with session_scope(self.engine) as session:
            repo.upsert_work_unit(session, self.job_id, repo.image_unit(index), status="running")
        self.queue.extend((index, shard, None) for shard in shards)

    def _shards(self) -> list[sampling.Shard]:
        """An image's shards, queued when it opens: both phases, one shard per actor each."""
        spec = self.spec
        return (sampling.plan_shards(spec.n0, spec.batch_size, len(self.actors), sampling.SELECTION)
                + sampling.plan_shards(spec.n, spec.batch_size, len(self.actors), sampling.ESTIMATION))

    def _dispatch(self) -> None:
        while self.queue and min(self.load) < TASKS_PER_ACTOR:
            self._send(*self.queue.popleft())

    def _send(self, index: int, shard: sampling.Shard, lost_at: float | None) -> None:
        slot = int(np.argmin(self.load))
        state, spec = self.images[index], self.spec
        ref = self.actors[slot].counts.remote(
            state.x, model=self.sources, sigma=spec.sigma, start=shard.start, count=shard.count,
            batch_size=spec.batch_size, seed=spec.seed, image=index, phase=shard.phase)
        self.in_flight[ref] = (index, shard, slot, lost_at)
        self.load[slot] += 1

    def _collect(self, ref) -> None:
        index, shard, slot, lost_at = self.in_flight.pop(ref)
        self.load[slot] -= 1
        try:
            reply = ray.get(ref)
        except ray.exceptions.RayActorError as lost:  # its process or node went away: Ray restarts the actor
            self._retry(index, shard, lost_at, lost)
            return
        state = self.images.get(index)
        if state is None:  # sequential: a batch past its image's decision
            return
        state.workers.add(reply["worker"])
        self._take(state, shard, reply)

    def _take(self, state: ImageState, shard: sampling.Shard, reply: dict) -> None:
        state.counts[shard.phase].append(reply["counts"])
        state.shards_left -= 1
        if state.shards_left == 0:
            self._finish(self.images.pop(state.index), reply["device"])

    def _retry(self, index: int, shard, lost_at: float | None, lost: Exception) -> None:
        """Sample the shard again: its counts depend only on its identity, so a redo gives the same counts.

        Ray may not retry it itself (a task on an unreachable process "may or may not have been
        executed"), and calls fail at once while the actor restarts: wait a little between tries.
        """
        if index not in self.images:  # sequential: its image was decided without it
            return
        now = time.monotonic()
        if lost_at is not None and now - lost_at > SHARD_RETRY_SECONDS:
            raise lost
        if lost_at is None:
            reason = str(lost).strip().splitlines()[-1][:200] if str(lost).strip() else ""
            with session_scope(self.engine) as session:
                repo.add_log(session, self.job_id, f"image {index}: {shard.phase} shard {shard.index} lost its "
                                                   f"sampler ({type(lost).__name__}: {reason}); retrying",
                             level="warning")
        time.sleep(POLL_SECONDS)
        self.queue.appendleft((index, shard, lost_at or now))

    def _finish(self, state: ImageState, device: str) -> None:
        spec = self.spec
        cert = smoothing.certify_counts(smoothing.sum_counts(state.counts[sampling.SELECTION]),
                                        smoothing.sum_counts(state.counts[sampling.ESTIMATION]),
                                        alpha=spec.alpha, sigma=spec.sigma, n0=spec.n0, n=spec.n)
        self._store(state, cert, device)

    def _store(self, state: ImageState, cert: smoothing.Certificate, device: str, extra: dict | None = None) -> None:
        with session_scope(self.engine) as session:
            certify.record_certificate(session, self.job_id, state.index, state.label, cert,
                                       seconds=time.perf_counter() - state.started,
                                       worker=",".join(sorted(state.workers)), device=device, model=self.model,
                                       extra=extra)
            self.advance(session)
        self.report()


class SequentialLoop(CertifyLoop):
    """Certifies each image at the target radius: selection shards, then estimation batches in rounds.

    A round is one batch per actor. An image has at most one round out at a time, so its decision
    leaves at most a round unused; other images fill the actors meanwhile, up to TASKS_PER_ACTOR
    tasks per actor in all. Batches come back in any order and are decided in batch order.
    """

    def run(self, todo: collections.deque) -> None:
        self.todo = todo
        while self.todo or self.images:
            self._dispatch()
            for ref in self.ready():
                self._collect(ref)

    def _dispatch(self) -> None:
        while min(self.load) < TASKS_PER_ACTOR:
            task = self._next_task()
            if task is None:
                return
            self._send(*task)

    def _next_task(self):
        """Queued shards first (selection, lost ones), then the oldest images' next batches, then a new image."""
        while self.queue:
            task = self.queue.popleft()
            if task[0] in self.images:
                return task
        for state in self.images.values():
            stream = state.stream
            if stream and state.sent < stream.batches and len(state.out) < len(self.actors):
                batch, state.sent = state.sent, state.sent + 1
                state.out.add(batch)
                return state.index, sampling.Shard(sampling.ESTIMATION, batch, *stream.span(batch)), None
        if self.todo:
            self._open(self.todo.popleft())
            return self._next_task()
        return None

    def _shards(self) -> list[sampling.Shard]:
        """The selection shards; estimation batches follow once cA is known."""
        return sampling.plan_shards(self.spec.n0, self.spec.batch_size, len(self.actors), sampling.SELECTION)

    def _take(self, state: ImageState, shard: sampling.Shard, reply: dict) -> None:
        spec = self.spec
        if shard.phase == sampling.SELECTION:
            state.counts[shard.phase].append(reply["counts"])
            state.shards_left -= 1
            if state.shards_left == 0:
                c_a = int(np.argmax(smoothing.sum_counts(state.counts[sampling.SELECTION])))
                test = sequential.SequentialTest.at_radius(spec.radius, spec.sigma, spec.alpha, spec.max_n)
                state.stream = sequential.Stream(test, c_a, spec.batch_size)
        else:
            state.out.discard(shard.index)
            state.stream.add(shard.index, reply["counts"])
        if state.stream and state.stream.decided:
            self._finish(self.images.pop(state.index), reply["device"])

    def _finish(self, state: ImageState, device: str) -> None:
        spec = self.spec
        cert = sequential.to_certificate(state.stream.test, smoothing.sum_counts(state.counts[sampling.SELECTION]),
                                         state.stream.counts, n0=spec.n0, sigma=spec.sigma, radius=spec.radius)
        self._store(state, cert, device, extra={**certify.sequential_extra(spec), "trace": state.stream.test.trace()})


class PredictLoop(CertifyLoop):
    """PREDICT: n samples of the prediction phase per image, then a class or an abstain (no radius)."""

    def _shards(self) -> list[sampling.Shard]:
        return sampling.plan_shards(self.spec.n, self.spec.batch_size, len(self.actors), sampling.PREDICTION)

    def _finish(self, state: ImageState, device: str) -> None:
        spec = self.spec
        counts = smoothing.sum_counts(state.counts[sampling.PREDICTION])
        prediction, p_value = bounds.prediction_test(counts, alpha=spec.alpha)
        answer = bounds.Certificate(prediction=prediction, radius=0.0, p_lower=0.0,
                                    counts_selection=np.zeros(0, dtype=np.int64), counts_estimation=counts,
                                    n0=0, n=spec.n, alpha=spec.alpha, sigma=spec.sigma)
        self._store(state, answer, device, extra=certify.predict_extra(p_value))
