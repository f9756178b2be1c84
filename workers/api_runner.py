"""Run a certify-api job: per image the clean query and n0 + n noisy ones, through the provider's actor.

The database is the source of truth: images with a result are skipped, answers already stored (by this
job, an earlier run or another job) are never asked again, and the budget counts the queries this job
paid for across all its runs. Queries stream over a window of images so the actor's concurrency cap
stays busy; an image is certified once all its answers are in. A budget that would be exceeded stops
the job after the queries in flight (partial answers are kept); ``dsq resume JOB --max-queries N``
goes on from there.

Sequential mode (a target radius): an image first asks its clean and n0 selection queries, then its
estimation queries in batches of ``QUERY_BATCH``, in sample order, one batch at a time, until the test
decides; the queries it needed are the ones it is billed for (fewer when answers are stored already).
PREDICT: the clean query and the n estimation queries, then a label or an abstain.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import time
from dataclasses import dataclass, field

import ray

from dsq import pipeline, sequential
from dsq.apis import base, images, labels
from dsq.apis import results as api_results
from dsq.kinds import certify_api
from dsq.errors import ApiQueryFailed, BudgetReached, NonFiniteOutput, UnreadableImage
from dsq.apis.ratelimit import limits_for
from dsq.db import repo
from dsq.db.session import session_scope
from workers import api_actor
from workers.loop import JobLoop

# Estimation queries per look of a sequential test: a clear-cut image stops within a few dozen queries,
# and at most 9 are sent past the point where a look after every query would have stopped.
QUERY_BATCH = 10


@dataclass
class ImageWork:
    index: int
    x: object
    about: dict
    queries: list[base.Query] = field(default_factory=list)  # asked so far, in order: clean, selection, estimation
    labels: dict[str, str] = field(default_factory=dict)
    pending: set[str] = field(default_factory=set)
    started: float = field(default_factory=time.perf_counter)
    rank: int = 0  # the order it was opened in: its queries are sent before those of images opened later
    test: sequential.SequentialTest | None = None  # sequential: once the selection answers are in
    c_a: str | None = None
    ahead: list[base.Query] = field(default_factory=list)  # sequential: encoded, not yet asked

    def top(self, phase: str) -> list[str]:
        return [self.labels[q.sha256] for q in self.queries if q.phase == phase]


def run(engine, settings, job_id: int, spec, control) -> None:
    with session_scope(engine) as session:
        denoiser = images.load_denoiser(session, spec, settings)
        done = repo.done_image_indices(session, job_id)
        paid = repo.count_paid_api_answers(session, job_id)
    source = images.ImageSource(spec, settings)
    todo = collections.deque(i for i in source.indices if i not in done)
    limits = limits_for(spec.provider, spec.qps, spec.burst, spec.concurrency)
    service = certify_api.service_name(spec)
    held = control.demand if control.demand is not None else certify_api.demand(spec, ray.cluster_resources())
    placement = certify_api.actor_resources(held)
    if placement:  # said before the actor starts: on an autoscaling cluster it waits for an api node to come up
        with session_scope(engine) as session:
            repo.add_log(session, job_id, f"the {spec.provider} API actor asks for {_amounts(placement)}: it runs on "
                                          f"an api node (the autoscaler starts one if none is up)")
    actor = api_actor.connect(spec.provider, spec.endpoint, service, limits, settings.db_grace_seconds,
                              resources=placement)
    with session_scope(engine) as session:
        for line in pipeline.notes(denoiser) if denoiser is not None else []:
            repo.add_log(session, job_id, line)  # a diffusion denoiser's timestep
        repo.add_log(session, job_id, f"{spec.provider} ({service}): {len(todo)} images to certify, "
                                      f"{paid} queries paid so far; qps {limits.qps:g}, burst {limits.burst}, "
                                      f"concurrency {limits.concurrency}")
    kind = SequentialApiLoop if spec.sequential else PredictApiLoop if spec.predict else ApiLoop
    loop = kind(engine, settings, job_id, spec, source, denoiser, actor, paid=paid,
                window=2 * limits.concurrency, done=len(source.indices) - len(todo), control=control)
    loop.run(todo)


def _amounts(resources: dict) -> str:
    return ", ".join(f"{amount:g} {name}" for name, amount in sorted(resources.items()))


class ApiLoop(JobLoop):
    """Opens images, sends their missing queries within the budget, certifies complete images."""

    def __init__(self, engine, settings, job_id, spec, source, denoiser, actor, *, paid, window, done, control):
        super().__init__(engine, job_id, control, done=done, total=len(source.indices))
        self.settings, self.spec, self.source, self.denoiser, self.actor = settings, spec, source, denoiser, actor
        self.paid, self.window, self.service = paid, window, certify_api.service_name(spec)
        self.images: dict[int, ImageWork] = {}
        self.waiting: dict[str, set[int]] = collections.defaultdict(set)
        # Unsent queries, the earliest opened image's first: a budget or a window goes to finishing the images
        # already open before later ones (a heap of (opened, order, digest, image)).
        self.queue: list[tuple[int, int, str, int]] = []
        self.opened = itertools.count()
        self.order = itertools.count()
        self.sent = 0
        self.over_budget = False

    def run(self, todo: collections.deque) -> None:
        while (todo and not self.over_budget) or self.queue or self.in_flight:
            while todo and self._room() and not self.over_budget:
                self._open(todo.popleft())
            self._dispatch()
            if self.over_budget and not self.in_flight:
                break
            for ref in self.ready():
                self._collect(ref)
        if self.over_budget:
            self._stop_for_budget()

    def _room(self) -> bool:
        """Open another image? While fewer queries than the window wait to be sent."""
        return len(self.queue) < self.window

    def _open(self, index: int) -> None:
        try:
            x = self.source.image(index)
        except UnreadableImage as error:
            return self._image_failed(index, str(error))
        with session_scope(self.engine) as session:
            repo.upsert_work_unit(session, self.job_id, repo.image_unit(index), status="running")
        self.images[index] = ImageWork(index, x, self.source.describe(index), rank=next(self.opened))
        self._advance(self.images[index])

    def _advance(self, work: ImageWork) -> None:
        """Ask an image's next queries while all it asked is answered; certify it once it needs none."""
        while not work.pending:
            try:
                queries = self._next_queries(work)
            except NonFiniteOutput as error:
                return self._image_failed(work.index, str(error))
            if queries is None:
                return self._finish(work)
            self._request(work, queries)

    def _next_queries(self, work: ImageWork) -> list[base.Query] | None:
        """Every query at once: the clean one, n0 selection and n estimation queries."""
        if work.queries:
            return None
        spec = self.spec
        return base.image_queries(work.x, self.denoiser, sigma=spec.sigma, seed=spec.seed, image=work.index,
                                  n0=spec.n0, n=spec.n, scale=spec.scale)

    def _request(self, work: ImageWork, queries: list[base.Query]) -> None:
        """Take stored answers from the database, queue the rest (once per digest, whichever image asks)."""
        digests = {q.sha256 for q in queries}
        with session_scope(self.engine) as session:
            stored = repo.api_answers(session, self.spec.provider, self.service, digests)
        work.queries += queries
        work.labels.update({digest: row.top_label for digest, row in stored.items()})
        work.pending = digests - set(work.labels)
        unsent = {q.sha256: q.image for q in queries if q.sha256 in work.pending}
        for digest, image in unsent.items():
            if not self.waiting[digest]:
                heapq.heappush(self.queue, (work.rank, next(self.order), digest, image))
            self.waiting[digest].add(work.index)

    def _dispatch(self) -> None:
        budget, self.over_budget = self.spec.max_queries, False
        while self.queue and len(self.in_flight) < self.window:
            if budget is not None and self.paid + self.sent >= budget:
                self.over_budget = True
                return
            _, _, digest, image = heapq.heappop(self.queue)
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
            self._advance(work)

    def _finish(self, work: ImageWork) -> None:
        del self.images[work.index]
        result = labels.certify_labels(work.top(labels.CLEAN)[0], work.top(labels.SELECTION), work.top(labels.ESTIMATION),
                                     alpha=self.spec.alpha, sigma=self.spec.sigma)
        self._record(work, result)

    def _record(self, work: ImageWork, result: labels.ApiCertificate, extra: dict | None = None) -> None:
        with session_scope(self.engine) as session:
            api_results.record_image(session, self.job_id, work.index, self.spec, result, work.queries, work.about,
                                  seconds=time.perf_counter() - work.started, worker=f"api:{self.service}",
                                  extra=extra)
        self._progress()

    def _image_failed(self, index: int, error: str) -> None:
        self.images.pop(index, None)
        self.queue = [item for item in self.queue if self.waiting.get(item[2]) != {index}]
        heapq.heapify(self.queue)
        for digest in [d for d, owners in self.waiting.items() if index in owners]:
            self.waiting[digest].discard(index)
        with session_scope(self.engine) as session:
            repo.upsert_work_unit(session, self.job_id, repo.image_unit(index), status="failed", error=error)
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


class SequentialApiLoop(ApiLoop):
    """Certifies each image at the target radius: clean and selection queries, then estimation batches in order.

    An image asks one batch at a time, so few queries wait while its answers are out: a new image opens
    only while fewer queries than the window are queued or in flight, and the earliest opened image's
    queries go first, so a budget goes to finishing the images already open rather than to starting many
    and finishing none.
    """

    def _room(self) -> bool:
        return len(self.queue) + len(self.in_flight) < self.window

    def _next_queries(self, work: ImageWork) -> list[base.Query] | None:
        spec = self.spec
        if not work.queries:
            return base.image_queries(work.x, self.denoiser, sigma=spec.sigma, seed=spec.seed, image=work.index,
                                      n0=spec.n0, n=0, scale=spec.scale)
        if work.test is None:
            work.c_a = labels.selection_winner(work.top(labels.CLEAN)[0], work.top(labels.SELECTION))
            work.test = sequential.SequentialTest.at_radius(spec.radius, spec.sigma, spec.alpha, spec.max_n)
        else:  # the batch just answered: the estimation queries past those the test has counted
            batch = [work.labels[q.sha256] for q in work.queries[1 + spec.n0 + work.test.trials:]]
            work.test.update(sum(label == work.c_a for label in batch), len(batch))
        if work.test.decision != sequential.CONTINUE:
            return None
        return self._estimation_batch(work)

    def _estimation_batch(self, work: ImageWork) -> list[base.Query]:
        """The next QUERY_BATCH estimation queries (at most max_n in all), encoded DENOISE_BATCH at a time."""
        spec, asked = self.spec, work.test.trials
        count = min(QUERY_BATCH, spec.max_n - asked)
        if len(work.ahead) < count:
            first = asked + len(work.ahead)
            work.ahead += base.phase_queries(work.x, self.denoiser, sigma=spec.sigma, seed=spec.seed,
                                             image=work.index, phase=labels.ESTIMATION, scale=spec.scale, first=first,
                                             num=min(base.DENOISE_BATCH, spec.max_n - first))
        batch, work.ahead = work.ahead[:count], work.ahead[count:]
        return batch

    def _finish(self, work: ImageWork) -> None:
        del self.images[work.index]
        spec = self.spec
        result = labels.certify_labels_at_radius(
            work.top(labels.CLEAN)[0], work.top(labels.SELECTION), work.top(labels.ESTIMATION), radius=spec.radius,
            alpha=spec.alpha, sigma=spec.sigma, max_n=spec.max_n, batch=QUERY_BATCH)
        self._record(work, result, {"mode": "sequential", "target_radius": spec.radius, "max_n": spec.max_n,
                                    "batch": QUERY_BATCH, "trace": result.trace})


class PredictApiLoop(ApiLoop):
    """PREDICT over the API's labels: the clean query and n noisy ones (those of certification's estimation
    phase, so stored answers serve both), then a label or an abstain."""

    def _finish(self, work: ImageWork) -> None:
        del self.images[work.index]
        result, p_value = labels.predict_labels(work.top(labels.CLEAN)[0], work.top(labels.ESTIMATION),
                                                alpha=self.spec.alpha, sigma=self.spec.sigma)
        self._record(work, result, {"mode": "predict", "p_value": p_value})
