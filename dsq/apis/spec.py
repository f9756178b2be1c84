"""The certify-api job spec: certify a black-box vision API (Salman et al. 2020, section 5).

Frozen and validated on construction, with a JSON round trip
(``ApiCertifySpec.from_dict(spec.to_dict()) == spec``) like ``dsq.specs.CertifySpec``.

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
import re
from dataclasses import dataclass
from typing import Any

from dsq import sequential, smoothing
from dsq.errors import InvalidArgument, UnknownName
from dsq.text import check_name

PROVIDERS = ("aws", "google", "azure", "clarifai")
EMBEDDED = "embedded"
MAX_CONCURRENCY = 64  # threads of one API actor
_ADDRESS = re.compile(r"^(https?://)?[A-Za-z0-9.\-\[\]:]+:\d{1,5}/?$")


@dataclass(frozen=True)
class ApiCertifySpec(sequential.TargetRadiusMode):
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
    endpoint: str | None = None
    denoiser: str | None = None
    n0: int = 20
    n: int = 100
    alpha: float = 0.001
    max_queries: int | None = None
    qps: float | None = None
    burst: int | None = None
    concurrency: int | None = None
    price_per_1000: float | None = None
    seed: int = 0
    radius: float | None = None  # a target radius: sequential certification (dsq.specs.check_target)
    max_n: int | None = None  # sequential: the most estimation queries per image (None: n)
    data_root: str | None = None
    name: str | None = None
    kind: str = "certify_api"

    def __post_init__(self):
        object.__setattr__(self, "inputs", tuple(self.inputs))
        if self.provider not in PROVIDERS:
            raise UnknownName(f"unknown provider {self.provider!r}; expected one of {', '.join(PROVIDERS)}")
        if self.kind != "certify_api":
            raise InvalidArgument(f"an API certification spec has kind 'certify_api', got {self.kind!r}")
        smoothing.validate(sigma=self.sigma, n0=self.n0, n=self.n, alpha=self.alpha, batch_size=1)
        from dsq.specs import check_sigma_scale, check_target

        check_sigma_scale(self.sigma)
        check_target(self)
        if self.name is not None:
            check_name(self.name, "job name")
        self._check_images()
        self._check_endpoint()
        self._check_limits()

    @property
    def queries_per_image(self) -> int:
        """n0 selection + n estimation queries (at most max_n in sequential mode) + the clean query."""
        return self.n0 + self.most_n + 1

    def references(self) -> tuple[str, ...]:
        return (self.denoiser,) if self.denoiser else ()

    def model_roles(self) -> list[tuple[str, str]]:
        return [(self.denoiser, "denoiser")] if self.denoiser else []

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["inputs"] = list(self.inputs)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ApiCertifySpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InvalidArgument(f"unknown field(s) in certify_api spec: {', '.join(sorted(unknown))}")
        return cls(**data)

    def with_budget(self, max_queries: int | None) -> "ApiCertifySpec":
        return dataclasses.replace(self, max_queries=max_queries)

    def _check_images(self):
        if bool(self.dataset) == bool(self.inputs):
            raise InvalidArgument("give either a dataset or a list of input images, not both and not neither")
        if any(not isinstance(path, str) or not path for path in self.inputs):
            raise InvalidArgument("every input must be a file path")
        if self.split not in ("train", "test"):
            raise InvalidArgument(f"split must be train or test, got {self.split!r}")
        _check_int("skip", self.skip)
        _check_int("scale", self.scale)
        for name in ("max_images", "size"):
            if getattr(self, name) is not None:
                _check_int(name.replace("_", " "), getattr(self, name))

    def _check_endpoint(self):
        if self.endpoint is None or self.endpoint == EMBEDDED:
            return
        if not isinstance(self.endpoint, str) or not _ADDRESS.match(self.endpoint):
            raise InvalidArgument(f"endpoint must be 'embedded', HOST:PORT or http://HOST:PORT, got {self.endpoint!r}")

    def _check_limits(self):
        if self.max_queries is not None:
            _check_int("max queries", self.max_queries)
            if self.max_queries < self.queries_per_image:
                n = "max n" if self.sequential else "n"
                raise InvalidArgument(f"max queries {self.max_queries} is smaller than one image needs "
                                      f"(n0 + {n} + 1 = {self.queries_per_image})")
        for name in ("qps", "price_per_1000"):
            value = getattr(self, name)
            if value is not None and (not _is_real(value) or not math.isfinite(value) or value < 0
                                      or (name == "qps" and value == 0)):
                raise InvalidArgument(f"{name.replace('_', ' ')} must be a finite number > 0, got {value!r}")
        if self.burst is not None:
            _check_int("burst", self.burst)
        if self.concurrency is not None:
            _check_int("concurrency", self.concurrency)
            if self.concurrency > MAX_CONCURRENCY:
                raise InvalidArgument(f"concurrency must be at most {MAX_CONCURRENCY}, got {self.concurrency}")


def _check_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidArgument(f"{name} must be an integer >= 1, got {value!r}")


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
