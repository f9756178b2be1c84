"""Run a certify-api job: per image the clean query and n0 + n noisy ones, through the provider's actor.

The database is the source of truth: images with a result are skipped, answers already stored (by this
job, an earlier run or another job) are never asked again, and the budget counts the queries this job
paid for across all its runs. Queries stream over a window of images so the actor's concurrency cap
stays busy; an image is certified once all its answers are in. A budget that would be exceeded stops
the job after the queries in flight (partial answers are kept); ``dsq resume JOB --max-queries N``
goes on from there.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

import ray

from dsq.apis import base
from dsq.apis import jobs as api_jobs
from dsq.errors import ApiQueryFailed, BudgetReached, NonFiniteOutput, UnreadableImage
from dsq.apis.ratelimit import limits_for
from dsq.db import repo
from dsq.db.session import session_scope
from workers import api_actor
from workers.loop import JobLoop


@dataclass
class ImageWork:
    index: int
    queries: list[base.Query]
    labels: dict[str, str]
    pending: set[str]
    about: dict
    started: float = field(default_factory=time.perf_counter)


def run(engine, settings, job_id: int, spec, control) -> None:
    with session_scope(engine) as session:
        denoiser = api_jobs.load_denoiser(session, spec, settings)
        done = repo.done_image_indices(session, job_id)
        paid = repo.count_paid_api_answers(session, job_id)
    source = api_jobs.ImageSource(spec, settings)
    todo = collections.deque(i for i in source.indices if i not in done)
    limits = limits_for(spec.provider, spec.qps, spec.burst, spec.concurrency)
    service = api_jobs.service_name(spec)
    actor = api_actor.connect(spec.provider, spec.endpoint, service, limits)
    with session_scope(engine) as session:
        repo.add_log(session, job_id, f"{spec.provider} ({service}): {len(todo)} images to certify, "
                                      f"{paid} queries paid so far; qps {limits.qps:g}, burst {limits.burst}, "
                                      f"concurrency {limits.concurrency}")
    loop = ApiLoop(engine, settings, job_id, spec, source, denoiser, actor, paid=paid,
                   window=2 * limits.concurrency, done=len(source.indices) - len(todo), control=control)
    loop.run(todo)


class ApiLoop(JobLoop):
    """Opens images, sends their missing queries within the budget, certifies complete images."""

    def __init__(self, engine, settings, job_id, spec, source, denoiser, actor, *, paid, window, done, control):
        super().__init__(engine, job_id, control, done=done, total=len(source.indices))
        self.settings, self.spec, self.source, self.denoiser, self.actor = settings, spec, source, denoiser, actor
        self.paid, self.window, self.service = paid, window, api_jobs.service_name(spec)
        self.images: dict[int, ImageWork] = {}
        self.waiting: dict[str, set[int]] = collections.defaultdict(set)
        self.queue: collections.deque = collections.deque()
        self.sent = 0
        self.over_budget = False

    def run(self, todo: collections.deque) -> None:
        while (todo and not self.over_budget) or self.queue or self.in_flight:
            while todo and len(self.queue) < self.window and not self.over_budget:
                self._open(todo.popleft())
            self._dispatch()
            if self.over_budget and not self.in_flight:
                break
            for ref in self.ready():
                self._collect(ref)
        if self.over_budget:
            self._stop_for_budget()

    def _open(self, index: int) -> None:
        spec = self.spec
        try:
            x = self.source.image(index)
        except UnreadableImage as error:
            return self._image_failed(index, str(error))
        try:
            queries = base.image_queries(x, self.denoiser, sigma=spec.sigma, seed=spec.seed, image=index,
                                         n0=spec.n0, n=spec.n, scale=spec.scale)
        except NonFiniteOutput as error:
            return self._image_failed(index, str(error))
        digests = {q.sha256 for q in queries}
        with session_scope(self.engine) as session:
            stored = repo.api_answers(session, spec.provider, self.service, digests)
            repo.upsert_work_unit(session, self.job_id, f"image:{index}", status="running")
        labels = {digest: row.top_label for digest, row in stored.items()}
        work = ImageWork(index, queries, labels, digests - set(labels), self.source.describe(index))
        self.images[index] = work
        unsent = {q.sha256: q.image for q in queries if q.sha256 in work.pending}
        for digest, image in unsent.items():
            if not self.waiting[digest]:
                self.queue.append((digest, image))
            self.waiting[digest].add(index)
        if not work.pending:
            self._finish(work)

    def _dispatch(self) -> None:
        budget, self.over_budget = self.spec.max_queries, False
        while self.queue and len(self.in_flight) < self.window:
            if budget is not None and self.paid + self.sent >= budget:
                self.over_budget = True
                return
            digest, image = self.queue.popleft()
            ref = self.actor.query(self.settings.database_url, self.job_id, digest, image)
            self.in_flight[ref] = digest
            self.sent += 1

    def _collect(self, ref) -> None:
        digest = self.in_flight.pop(ref)
        reply = ray.get(ref)
        self.sent -= 1
        self.paid += int(reply.get("paid", False))
        if "error" in reply and not reply["fatal"]:
            raise ApiQueryFailed(f"{self.spec.provider} query failed: {reply['error']}")
        for index in sorted(self.waiting.pop(digest, ())):
            work = self.images.get(index)
            if work is None:
                continue
            if "error" in reply:
                self._image_failed(index, f"{self.spec.provider} refused a query: {reply['error']}")
                continue
            work.labels[digest] = reply["top_label"]
            work.pending.discard(digest)
            if not work.pending:
                self._finish(work)

    def _finish(self, work: ImageWork) -> None:
        del self.images[work.index]
        labels = [work.labels[q.sha256] for q in work.queries]
        phases = [q.phase for q in work.queries]
        result = base.certify_labels(
            labels[0], [label for label, phase in zip(labels, phases) if phase == base.SELECTION],
            [label for label, phase in zip(labels, phases) if phase == base.ESTIMATION],
            alpha=self.spec.alpha, sigma=self.spec.sigma)
        with session_scope(self.engine) as session:
            api_jobs.record_image(session, self.job_id, work.index, self.spec, result, work.queries, work.about,
                                  seconds=time.perf_counter() - work.started, worker=f"api:{self.service}")
        self._progress()

    def _image_failed(self, index: int, error: str) -> None:
        self.images.pop(index, None)
        self.queue = collections.deque(item for item in self.queue if self.waiting.get(item[0]) != {index})
        for digest in [d for d, owners in self.waiting.items() if index in owners]:
            self.waiting[digest].discard(index)
        with session_scope(self.engine) as session:
            repo.upsert_work_unit(session, self.job_id, f"image:{index}", status="failed", error=error)
            repo.add_log(session, self.job_id, f"image {index}: {error}", level="warning")
        self._progress()

    def _progress(self) -> None:
        with session_scope(self.engine) as session:
            self.advance(session)
        self.report()

    def _stop_for_budget(self) -> None:
        with session_scope(self.engine) as session:
            paid = repo.count_paid_api_answers(session, self.job_id)
        raise BudgetReached(f"query budget reached: {paid} of {self.spec.max_queries} queries paid, "
                            f"{self.done} of {self.total} images done; raise it with "
                            f"`dsq resume {self.job_id} --max-queries N`")
