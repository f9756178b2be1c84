"""certify-api jobs: checks before submission, cost estimates, results, offline re-certification.

The runner (``workers/api_runner.py``) and the API actor (``workers/api_actor.py``) call these; nothing
here imports Ray. Prices are list prices per 1,000 queries of each vendor's first pricing tier when this
was written (USD); pass ``price_per_1000`` in the spec (``--price-per-1000``) for your own contract.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Mapping

import torch
from sqlalchemy.orm import Session

from dsq import checkpoints, datasets, references, smoothing, specs
from dsq.apis import base, providers
from dsq.errors import EndpointUnreachable, UnreadableImage
from dsq.apis.ratelimit import limits_for
from dsq.apis.spec import EMBEDDED, ApiCertifySpec
from dsq.db import repo
from dsq.errors import DatasetMissing, InvalidArgument, JobStateError
from dsq.settings import Settings

PRICES_PER_1000 = {
    "aws": 1.00,       # Rekognition Image, DetectLabels, first 1M images a month
    "google": 1.50,    # Cloud Vision label detection, 1,001st to 5Mth unit a month
    "azure": 1.00,     # AI Vision Image Analysis S1, tags, first 1M transactions a month
    "clarifai": 1.20,  # general image recognition, pay-as-you-go
}
VENDOR = "vendor"


def default_endpoint(provider: str, env: Mapping[str, str]) -> str | None:
    """The vendor when credentials are configured, else the embedded emulator."""
    return None if providers.has_credentials(provider, env) else EMBEDDED


def service_name(spec: ApiCertifySpec) -> str:
    """Who answers: ``vendor``, ``embedded`` or ``emulator:HOST:PORT`` (part of the answer cache key)."""
    if spec.endpoint is None:
        return VENDOR
    return EMBEDDED if spec.endpoint == EMBEDDED else f"emulator:{providers.host_port(spec.endpoint)}"


# -- images ------------------------------------------------------------------------------


class ImageSource:
    """The images a job certifies: dataset items or input files, by image index."""

    def __init__(self, spec: ApiCertifySpec, settings: Settings):
        self.spec = spec
        if spec.dataset:
            self.dataset = datasets.get_dataset(spec.dataset, spec.split, root=spec.data_root or settings.data_root,
                                                size=spec.size)
            self.indices = datasets.test_subset(self.dataset, skip=spec.skip, max=spec.max_images)
        else:
            indices = list(range(0, len(spec.inputs), spec.skip))
            self.indices = indices[:spec.max_images] if spec.max_images else indices

    def image(self, index: int) -> torch.Tensor:
        """Image ``index`` as [C, H, W] in [0, 1]; UnreadableImage for a bad input file."""
        if self.spec.dataset:
            return self.dataset[index][0]
        if not os.path.isfile(self.spec.inputs[index]):
            raise UnreadableImage(f"{self.spec.inputs[index]}: file not found")
        return base.load_image(self.spec.inputs[index], self.spec.size)

    def describe(self, index: int) -> dict:
        if self.spec.dataset:
            label = int(self.dataset[index][1])
            return {"dataset": self.spec.dataset, "split": self.spec.split, "dataset_label": label}
        return {"input": self.spec.inputs[index]}


def load_denoiser(session: Session, spec: ApiCertifySpec, settings: Settings) -> torch.nn.Module | None:
    if not spec.denoiser:
        return None
    return checkpoints.load_checkpoint(references.resolve(session, spec.denoiser, settings))[0].eval()


# -- checks and estimates ----------------------------------------------------------------


def check_spec(session: Session, spec: ApiCertifySpec, settings: Settings, env: Mapping[str, str] | None = None) -> int:
    """Check that the job can run (n, credentials, endpoint, images, denoiser); return its image count."""
    env = providers.environment() if env is None else env
    specs.reach(spec)
    if spec.endpoint is None:
        providers.check_credentials(spec.provider, env)
    elif spec.endpoint != EMBEDDED:
        check_reachable(spec.endpoint)
    missing = [path for path in spec.inputs if not os.path.isfile(path)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DatasetMissing(f"input not found: {missing[0]}{more}")
    source = ImageSource(spec, settings)
    if not source.indices:
        raise InvalidArgument("no images to certify")
    ready = spec.denoiser is None or references.available(session, spec.denoiser)
    denoiser = load_denoiser(session, spec, settings) if ready else None  # else checked when the job runs
    if denoiser is not None:
        _check_denoiser(denoiser, source)
    return len(source.indices)


def check_reachable(endpoint: str, timeout: float = 3.0) -> None:
    host, _, port = providers.host_port(endpoint).rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as error:
        raise EndpointUnreachable(f"nothing answers at endpoint {endpoint}: {error}") from None


def _check_denoiser(denoiser: torch.nn.Module, source: ImageSource) -> None:
    for index in source.indices:
        try:
            x = source.image(index)
        except UnreadableImage:
            continue
        with torch.inference_mode():
            try:
                out = denoiser(x[None])
            except RuntimeError as error:
                first = str(error).strip().splitlines()[0]
                raise InvalidArgument(f"the denoiser cannot take an image of shape {tuple(x.shape)}: {first}") from None
        if out.shape != x[None].shape:
            raise InvalidArgument(f"the denoiser maps {tuple(x.shape)} to {tuple(out.shape[1:])}; "
                                  "it must keep the shape")
        return


@dataclass(frozen=True)
class Estimate:
    images: int
    queries: int
    budget: int | None
    price_per_1000: float
    qps: float
    per_image: str = "n0 + n + 1"  # sequential: "n0 + max n + 1", a bound it usually stays far below

    @property
    def billed(self) -> int:
        return min(self.queries, self.budget) if self.budget else self.queries

    @property
    def cost(self) -> float:
        return self.billed * self.price_per_1000 / 1000

    @property
    def seconds(self) -> float:
        return self.billed / self.qps

    def lines(self, provider: str) -> list[str]:
        budget = f", budget {self.budget}" if self.budget else ""
        return [f"{provider}: {self.images} images x ({self.per_image}) = {self.queries} queries at most{budget}",
                f"cost at most ${self.cost:,.2f} (${self.price_per_1000:g} per 1,000; stored answers are not re-paid)",
                f"time at least {self.seconds:,.1f} s at {self.qps:g} queries/s"]


def estimate(spec: ApiCertifySpec, images: int) -> Estimate:
    """Upper bound on queries, cost and a lower bound on time (answers already stored cost nothing)."""
    price = spec.price_per_1000 if spec.price_per_1000 is not None else PRICES_PER_1000[spec.provider]
    qps = limits_for(spec.provider, spec.qps, spec.burst, spec.concurrency).qps
    per_image = "n0 + max n + 1" if spec.sequential else "n0 + n + 1"
    return Estimate(images, images * spec.queries_per_image, spec.max_queries, price, qps, per_image)


def raise_budget(session: Session, job_id: int, max_queries: int | None) -> ApiCertifySpec:
    """Store a new query budget in a certify-api job's spec (``None``: no budget) before a resume."""
    job = repo.get_job(session, job_id)
    if job.kind != "certify_api":
        raise InvalidArgument(f"--max-queries applies to certify-api jobs; job {job_id} is a {job.kind} job")
    spec = ApiCertifySpec.from_dict(job.spec).with_budget(max_queries)
    paid = repo.count_paid_api_answers(session, job_id)
    if max_queries is not None and max_queries <= paid:
        raise InvalidArgument(f"job {job_id} already paid for {paid} queries: --max-queries must be larger")
    repo.set_job_spec(session, job_id, spec.to_dict())
    return spec


# -- results -----------------------------------------------------------------------------


def record_image(session: Session, job_id: int, index: int, spec: ApiCertifySpec, result: base.ApiCertificate,
                 queries: list[base.Query], about: dict, *, seconds: float, worker: str | None,
                 extra: dict | None = None) -> None:
    """Upsert one image's certificate (string labels and ``extra`` in ``extra``) and mark its work unit done."""
    cert = result.cert
    digests = {phase: [q.sha256 for q in queries if q.phase == phase]
               for phase in (base.SELECTION, base.ESTIMATION)}
    extra = {**about, "provider": spec.provider, "service": service_name(spec), "labels": result.labels,
             "clean_label": result.clean_label, "certified_label": result.certified_label,
             "encoding": base.ENCODING, "scale": spec.scale, "denoiser": spec.denoiser,
             "sha256": {"clean": queries[0].sha256, **digests}, **(extra or {})}
    repo.upsert_result(
        session, job_id, index, label=result.label_index, prediction=cert.prediction, radius=cert.radius,
        correct=result.correct, p_lower=cert.p_lower, counts_selection=cert.counts_selection,
        counts_estimation=cert.counts_estimation, n0=cert.n0, n=cert.n, alpha=cert.alpha, sigma=cert.sigma,
        seconds=seconds, worker=worker, device="api", extra=extra)
    repo.upsert_work_unit(session, job_id, f"image:{index}", status="done", worker=worker)


def recertify(session: Session, job_id: int, alpha: float | None = None) -> list[dict]:
    """Certify a certify-api job again from its stored raw answers, optionally at another alpha; no query.

    A sequential job's test runs again at that alpha on the stored batches, in order; an image whose
    stored answers run out before it decides is not certified (stopping early keeps the guarantee).
    """
    job = repo.get_job(session, job_id)
    if job.kind != "certify_api":
        raise InvalidArgument(f"job {job_id} is a {job.kind} job, not a certify-api job")
    rows = repo.results_for_job(session, job_id)
    if not rows:
        raise JobStateError(f"job {job_id} has no results yet (status {job.status})")
    return [_recertify_row(session, row, alpha if alpha is not None else row.alpha) for row in rows]


def _recertify_row(session: Session, row, alpha: float) -> dict:
    smoothing.validate(sigma=row.sigma, n0=1, n=1, alpha=alpha, batch_size=1)
    extra = row.extra
    digests = extra["sha256"]
    everything = [digests["clean"], *digests[base.SELECTION], *digests[base.ESTIMATION]]
    stored = repo.api_answers(session, extra["provider"], extra["service"], everything)
    missing = [d for d in everything if d not in stored]
    if missing:
        raise JobStateError(f"image {row.image_index}: {len(missing)} stored answers are missing")

    def top(digest: str) -> str:
        return base.top_label(providers.labels(extra["provider"], stored[digest].answer))

    labels = (top(digests["clean"]), [top(d) for d in digests[base.SELECTION]],
              [top(d) for d in digests[base.ESTIMATION]])
    if extra.get("mode") == "sequential":  # the test again at this alpha, on the batches stored; never a fixed-n bound
        result = base.certify_labels_at_radius(*labels, radius=extra["target_radius"], alpha=alpha, sigma=row.sigma,
                                               max_n=extra["max_n"], batch=extra["batch"])
    else:
        result = base.certify_labels(*labels, alpha=alpha, sigma=row.sigma)
    return {"image_index": row.image_index, "label": result.label_index, "prediction": result.cert.prediction,
            "radius": result.cert.radius, "correct": result.correct, "seconds": row.seconds,
            "p_lower": result.cert.p_lower, "alpha": alpha, "clean_label": result.clean_label,
            "certified_label": result.certified_label}
