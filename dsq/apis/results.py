"""The results of certify-api jobs: one image's certificate stored, and a job certified again offline.

``record_image`` stores what the runner certified, with the digests of every query it sent; ``recertify``
certifies a job again from those stored raw answers, optionally at another alpha, sending no query. No torch.
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from dsq import bounds
from dsq.apis import labels, providers
from dsq.db import repo
from dsq.errors import InvalidArgument, JobStateError
from dsq.kinds.certify_api import ApiCertifySpec, service_name


def record_image(session: Session, job_id: int, index: int, spec: ApiCertifySpec, result: labels.ApiCertificate,
                 queries: list, about: dict, *, seconds: float, worker: str | None,
                 extra: dict | None = None) -> None:
    """Upsert one image's certificate (string labels and ``extra`` in ``extra``) and mark its work unit done."""
    cert = result.cert
    digests = {phase: [q.sha256 for q in queries if q.phase == phase]
               for phase in (labels.SELECTION, labels.ESTIMATION)}
    extra = {**about, "provider": spec.provider, "service": service_name(spec), "labels": result.labels,
             "clean_label": result.clean_label, "certified_label": result.certified_label,
             "encoding": labels.ENCODING, "scale": spec.scale, "denoiser": spec.denoiser,
             "sha256": {"clean": queries[0].sha256, **digests}, **(extra or {})}
    repo.upsert_result(
        session, job_id, index, label=result.label_index, prediction=cert.prediction, radius=cert.radius,
        correct=result.correct, p_lower=cert.p_lower, counts_selection=cert.counts_selection,
        counts_estimation=cert.counts_estimation, n0=cert.n0, n=cert.n, alpha=cert.alpha, sigma=cert.sigma,
        seconds=seconds, worker=worker, device="api", extra=extra)
    repo.upsert_work_unit(session, job_id, repo.image_unit(index), status="done", worker=worker)


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
    bounds.validate(sigma=row.sigma, n0=1, n=1, alpha=alpha, batch_size=1)
    extra = row.extra
    digests = extra["sha256"]
    everything = [digests["clean"], *digests[labels.SELECTION], *digests[labels.ESTIMATION]]
    stored = repo.api_answers(session, extra["provider"], extra["service"], everything)
    missing = [d for d in everything if d not in stored]
    if missing:
        raise JobStateError(f"image {row.image_index}: {len(missing)} stored answers are missing")

    def top(digest: str) -> str:
        return labels.top_label(providers.labels(extra["provider"], stored[digest].answer))

    tops = (top(digests["clean"]), [top(d) for d in digests[labels.SELECTION]],
            [top(d) for d in digests[labels.ESTIMATION]])
    if extra.get("mode") == "predict":
        result, _ = labels.predict_labels(tops[0], tops[2], alpha=alpha, sigma=row.sigma)
    elif extra.get("mode") == "sequential":  # the test again at this alpha, on the batches stored; never a fixed-n bound
        result = labels.certify_labels_at_radius(*tops, radius=extra["target_radius"], alpha=alpha, sigma=row.sigma,
                                                 max_n=extra["max_n"], batch=extra["batch"])
    else:
        result = labels.certify_labels(*tops, alpha=alpha, sigma=row.sigma)
    return {"image_index": row.image_index, "label": result.label_index, "prediction": result.cert.prediction,
            "radius": result.cert.radius, "correct": result.correct, "seconds": row.seconds,
            "p_lower": result.cert.p_lower, "alpha": alpha, "clean_label": result.clean_label,
            "certified_label": result.certified_label}
