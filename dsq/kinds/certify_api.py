"""The ``certify-api`` kind: certify a black-box vision API (Salman et al. 2020, section 5).

Its spec, its submit-time check (credentials, endpoint, images, denoiser), what a running job holds, its
cost estimate and its budget (``dsq.apis.results`` stores its certificates). Its runner, on the Ray side, calls these.
Nothing here imports torch at module level (``dsq resume --max-queries`` rebuilds the spec).

``endpoint`` says which server answers the queries:

- ``None``        the vendor's real service (credentials from the SDK's standard configuration)
- ``"embedded"``  an emulator started inside the API actor (no credentials, nothing leaves the machine)
- ``HOST:PORT`` or ``http://HOST:PORT``  an emulator (``dsq emulate``) or any compatible server

Images come from a registered dataset (``dataset``, ``split``, ``skip``, ``max_images``) or from a list of
image files (``inputs``); the image index of a file is its position in the list. Credentials are never part
of a spec.

With a target ``radius`` the job certifies sequentially (``dsq.sequential``): estimation queries go out in
batches, in sample order, until the test decides "radius >= r or not", at most ``max_n`` per image (default n).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Mapping

from sqlalchemy.orm import Session

from dsq import checks, references, specs
from dsq.apis import providers, ratelimit
from dsq.db import repo
from dsq.errors import DatasetMissing, EndpointUnreachable, InvalidArgument, UnknownName
from dsq.settings import Settings

DEFAULT_N = 100  # estimation queries per image: Salman et al.'s API experiments (section 5) use n = 100
_ADDRESS = re.compile(r"^(https?://)?[A-Za-z0-9.\-\[\]:]+:\d{1,5}/?$")
PRICES_PER_1000 = {
    "aws": 1.00,       # Rekognition Image, DetectLabels, first 1M images a month
    "google": 1.50,    # Cloud Vision label detection, 1,001st to 5Mth unit a month
    "azure": 1.00,     # AI Vision Image Analysis S1, tags, first 1M transactions a month
    "clarifai": 1.20,  # general image recognition, pay-as-you-go
}
VENDOR = "vendor"
# The custom resource of ray_cluster.yaml's api nodes (README.md, "Running on a cluster"): an API job asks for one
# unit of it wherever the cluster offers it, so the rate-limited API actors live there, off the GPU nodes.
API_RESOURCE = "dsq_api"


@dataclass(frozen=True)
class ApiCertifySpec(specs.TargetRadiusMode):
    """Certify ``provider``'s smoothed top label (optionally behind a denoiser) on images."""

    provider: str
    sigma: float
    dataset: str | None = None
    inputs: tuple[str, ...] = ()
    split: str = "test"
    skip: int = 1
    max_images: int | None = None
    size: int | None = None
    scale: int = 1
    classes: tuple[str, ...] | None = None  # a folder's class order (None: sorted, pinned at submit)
    endpoint: str | None = None
    denoiser: str | None = None
    n0: int = 20
    n: int = DEFAULT_N
    alpha: float = 0.001
    max_queries: int | None = None
    qps: float | None = None
    burst: int | None = None
    concurrency: int | None = None
    price_per_1000: float | None = None
    seed: int = 0
    radius: float | None = None  # a target radius: sequential certification (dsq.specs.check_certification)
    max_n: int | None = None  # sequential: the most estimation queries per image (None: n)
    predict: bool = False  # Cohen et al.'s PREDICT over the API's labels: n queries (n0 = 0), a label or an abstain
    data_root: str | None = None
    name: str | None = None
    uploads: dict = field(default_factory=dict)  # local paths in the artifact store (dsq.uploads)
    kind: str = "certify_api"

    def __post_init__(self):
        object.__setattr__(self, "inputs", specs.input_files(self.dataset, self.inputs))
        if self.provider not in providers.PROVIDERS:
            raise UnknownName(f"unknown provider {self.provider!r}; expected one of {', '.join(providers.PROVIDERS)}")
        specs.check_common(self, "certify_api")
        specs.check_classes(self)
        specs.check_certification(self)
        self._check_images()
        self._check_endpoint()
        self._check_limits()

    @property
    def queries_per_image(self) -> int:
        """n0 selection + n estimation queries (at most max_n in sequential mode; n0 = 0 for PREDICT) + the clean
        query."""
        return self.n0 + self.most_n + 1

    def references(self) -> tuple[str, ...]:
        return (self.denoiser,) if self.denoiser else ()

    def model_roles(self) -> list[tuple[str, str]]:
        return [(self.denoiser, "denoiser")] if self.denoiser else []

    def to_dict(self) -> dict:
        return specs.to_dict(self)

    def with_budget(self, max_queries: int | None) -> "ApiCertifySpec":
        return dataclasses.replace(self, max_queries=max_queries)

    def _check_images(self):
        if self.split not in ("train", "test"):
            raise InvalidArgument(f"split must be train or test, got {self.split!r}")
        checks.positive_int("skip", self.skip)
        checks.positive_int("scale", self.scale)
        for name in ("max_images",):
            if getattr(self, name) is not None:
                checks.positive_int(name.replace("_", " "), getattr(self, name))

    def _check_endpoint(self):
        if self.endpoint is None or self.endpoint == providers.EMBEDDED:
            return
        if not isinstance(self.endpoint, str) or not _ADDRESS.match(self.endpoint):
            raise InvalidArgument(f"endpoint must be 'embedded', HOST:PORT or http://HOST:PORT, got {self.endpoint!r}")

    def _check_limits(self):
        if self.max_queries is not None:
            checks.positive_int("max queries", self.max_queries)
            if self.max_queries < self.queries_per_image:
                n = "max n" if self.sequential else "n"
                raise InvalidArgument(f"max queries {self.max_queries} is smaller than one image needs "
                                      f"(n0 + {n} + 1 = {self.queries_per_image})")
        for name in ("qps", "price_per_1000"):
            value = getattr(self, name)
            if value is not None and (not checks.is_real(value) or not math.isfinite(value) or value < 0
                                      or (name == "qps" and value == 0)):
                raise InvalidArgument(f"{name.replace('_', ' ')} must be a finite number > 0, got {value!r}")
        if self.burst is not None:
            checks.positive_int("burst", self.burst)
        if self.concurrency is not None:
            checks.positive_int("concurrency", self.concurrency)
            if self.concurrency > ratelimit.MAX_CONCURRENCY:
                raise InvalidArgument(f"concurrency must be at most {ratelimit.MAX_CONCURRENCY}, "
                                      f"got {self.concurrency}")


def default_endpoint(provider: str, env: Mapping[str, str]) -> str | None:
    """The vendor when credentials are configured, else the embedded emulator."""
    return None if providers.has_credentials(provider, env) else providers.EMBEDDED


def service_name(spec: ApiCertifySpec) -> str:
    """Who answers: ``vendor``, ``embedded`` or ``emulator:HOST:PORT`` (part of the answer cache key)."""
    if spec.endpoint is None:
        return VENDOR
    if spec.endpoint == providers.EMBEDDED:
        return providers.EMBEDDED
    return f"emulator:{providers.host_port(spec.endpoint)}"


def check(session: Session, spec: ApiCertifySpec, settings: Settings, env: Mapping[str, str] | None = None) -> int:
    """Check that the job can run (n, credentials, endpoint, images, denoiser); return its image count."""
    from dsq.apis import images  # torch: images and the denoiser are loaded

    env = providers.environment() if env is None else env
    if spec.endpoint is None:
        providers.check_credentials(spec.provider, env)
    elif spec.endpoint != providers.EMBEDDED:
        check_reachable(spec.endpoint)
    missing = [path for path in spec.inputs if not os.path.isfile(path)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DatasetMissing(f"input not found: {missing[0]}{more}")
    source = images.ImageSource(spec, settings)
    if not source.indices:
        raise InvalidArgument("no images to certify")
    ready = spec.denoiser is None or references.available(session, spec.denoiser)
    denoiser = images.load_denoiser(session, spec, settings) if ready else None  # else checked when the job runs
    if denoiser is not None:
        images.check_denoiser(denoiser, source)
    return len(source.indices)


def check_reachable(endpoint: str, timeout: float = 3.0) -> None:
    host, _, port = providers.host_port(endpoint).rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as error:
        raise EndpointUnreachable(f"nothing answers at endpoint {endpoint}: {error}") from None


def demand(spec: ApiCertifySpec, cluster: dict) -> dict:
    """Its API actor mostly waits on the network: a quarter of a CPU; and one unit of ``dsq_api`` where the cluster
    offers it (``cluster`` has some: api nodes are up, or the worker's autoscaling cap names it), so that its actor
    lives on an api node. Never where nobody offers it: the job would wait forever."""
    return {"CPU": 0.25, **({API_RESOURCE: 1.0} if cluster.get(API_RESOURCE, 0) > 0 else {})}


def actor_resources(held: dict) -> dict:
    """The custom resources the API actor of a job that holds ``held`` (its demand) asks Ray for."""
    return {API_RESOURCE: held[API_RESOURCE]} if held.get(API_RESOURCE) else {}


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
    price = price_of(spec.to_dict())
    qps = ratelimit.limits_for(spec.provider, spec.qps, spec.burst, spec.concurrency).qps
    per_image = "n0 + max n + 1" if spec.sequential else "n + 1" if spec.predict else "n0 + n + 1"
    return Estimate(images, images * spec.queries_per_image, spec.max_queries, price, qps, per_image)


def price_of(spec: dict) -> float:
    """The price per 1,000 queries a stored spec (``job.spec``) pays: its own, else the provider's list price."""
    given = spec.get("price_per_1000")
    return given if given is not None else PRICES_PER_1000[spec["provider"]]


def spend(session: Session, job) -> str | None:
    """What a certify-api job spent, in a line: the queries it paid (as the budget counts them), the answers its
    stored images took from the cache (paid by another job or run before), and the dollars; None for other kinds."""
    if job.kind != "certify_api":
        return None
    paid = repo.count_paid_api_answers(session, job.id)
    used: dict[tuple[str, str], set[str]] = {}
    for row in repo.results_for_job(session, job.id):
        digests = (row.extra or {}).get("sha256", {})
        used.setdefault((row.extra["provider"], row.extra["service"]), set()).update(
            [digests.get("clean"), *digests.get("selection", []), *digests.get("estimation", [])])
    reused = sum(answer.job_id != job.id for (provider, service), digests in used.items()
                 for answer in repo.api_answers(session, provider, service, digests - {None}).values())
    price = price_of(job.spec)
    dollars = paid * price / 1000
    shown = f"{dollars:,.2f}" if dollars >= 1 else f"{dollars:.4g}"
    return (f"API spend: {paid:,} queries paid, {reused:,} answers reused from the cache, about ${shown} "
            f"at ${price:g} per 1,000 queries")


def raise_budget(session: Session, job_id: int, max_queries: int | None) -> ApiCertifySpec:
    """Store a new query budget in a certify-api job's spec (``None``: no budget) before a resume."""
    job = repo.get_job(session, job_id)
    if job.kind != "certify_api":
        raise InvalidArgument(f"--max-queries applies to certify-api jobs; job {job_id} is a {job.kind} job")
    spec = specs.rebuild(ApiCertifySpec, job.spec).with_budget(max_queries)
    paid = repo.count_paid_api_answers(session, job_id)
    if max_queries is not None and max_queries <= paid:
        raise InvalidArgument(f"job {job_id} already paid for {paid} queries: it needs --max-queries larger than "
                              f"{paid}, got {max_queries}")
    repo.set_spec(session, job_id, spec.to_dict())
    return spec


KIND = specs.Kind(name="certify_api", spec=ApiCertifySpec, check=check, demand=demand)
