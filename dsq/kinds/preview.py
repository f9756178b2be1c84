"""The ``preview`` kind: on request (``dsq preview JOB IMAGE``), a few noisy samples of one image of a certify job
beside their denoised versions (``dsq.previews``), stored with that job's image for its dashboard page.

A certify job makes the previews of its first images itself (its spec's ``previews``); this kind makes one of
any other image. Its spec names the job and the image and carries a copy of that job's spec (``of``), so it runs
the same models on the same data at the same σ and seed, and waits for the same trainings. Work: one image.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.orm import Session

from dsq import checks, specs
from dsq.db import repo
from dsq.errors import InvalidArgument
from dsq.kinds.certify import CertifySpec
from dsq.settings import Settings


@dataclass(frozen=True, kw_only=True)
class PreviewSpec:
    """The preview of image ``image`` of certify job ``job``, whose spec ``of`` is."""

    job: int
    image: int
    of: dict
    name: str | None = None
    kind: str = "preview"

    def __post_init__(self):
        checks.positive_int("job", self.job)
        checks.positive_int("image", self.image, minimum=0)
        if not isinstance(self.of, dict):
            raise InvalidArgument(f"of must be a certify spec (a JSON object), got {self.of!r}")
        self.certify  # noqa: B018 - rebuilding the copy checks it
        specs.check_common(self, "preview")

    @property
    def certify(self) -> CertifySpec:
        """The certify job's spec, as it was when the preview was asked for."""
        return specs.rebuild(CertifySpec, self.of)

    @property
    def seed(self) -> int:
        return self.certify.seed

    @property
    def models(self) -> dict:
        return self.certify.models

    def model_roles(self) -> list[tuple[str, str]]:
        return self.certify.model_roles()

    def to_dict(self) -> dict:
        return specs.to_dict(self)


def request(session: Session, job_id: int, image: int, settings: Settings, name: str | None = None) -> PreviewSpec:
    """The spec of a preview of ``image`` of certify job ``job_id``; one line (``DsqError``) when there is none to
    make: no such job, a job of another kind (a certify-api job's noisy queries are its stored answers), an image
    the job does not cover."""
    job = repo.get_job(session, job_id)
    if job.kind == "certify_api":
        raise InvalidArgument(f"job {job_id} is a certify-api job: its noisy queries are the answers stored with "
                              f"each image (its image pages list them); previews are of certify jobs")
    if job.kind != "certify":
        raise InvalidArgument(f"job {job_id} is a {job.kind} job: previews are of the images of certify jobs")
    spec = PreviewSpec(job=job_id, image=checks.positive_int("image", image, minimum=0), of=job.spec, name=name)
    from dsq import pipeline  # torch: a submission reads the data anyway

    target = spec.certify
    plan = pipeline.image_plan(target, pipeline.images(target, settings.data_root_of(target)))
    if image not in plan:
        every = f", every {target.skip}th" if target.skip > 1 else ""
        raise InvalidArgument(f"job {job_id} has no image {image}: it covers {len(plan)} images ({plan[0]} to "
                              f"{plan[-1]}{every})" if plan else f"job {job_id} covers no image")
    return spec


def check(session: Session, spec: PreviewSpec, settings: Settings) -> int:
    """The job is still there and covers the image; work = one image."""
    request(session, spec.job, spec.image, settings)
    return 1


def demand(spec: PreviewSpec, cluster: dict) -> dict:
    """One sampler actor: a GPU where the cluster has one, else a CPU."""
    return {"GPU": 1.0} if specs.on_gpu(cluster) else {"CPU": 1.0}


KIND = specs.Kind(name="preview", spec=PreviewSpec, check=check, demand=demand)
