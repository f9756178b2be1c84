"""What each page of the dashboard shows, and the JSON behind it: read in one session through ``dsq.views`` and
``dsq.report``, the code ``dsq jobs``, ``show``, ``results`` and ``compare`` print with, so that the page and the
terminal never disagree.

Each function takes a session and returns a plain dict (strings, numbers, lists) that a template renders and the
JSON routes return. A missing job, image or experiment raises ``dsq.errors.JobNotFound`` or ``JobStateError``.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from datetime import datetime, timedelta
from typing import Callable

from sqlalchemy.orm import Session

from dsq import jobqueue, views
from dsq.dashboard import curves
from dsq.db import repo
from dsq.errors import JobNotFound
from dsq.report import exports, predictions, summary, tables

JOBS_SHOWN = 200  # newest jobs on the queue page and in its live poll
WORKERS_SHOWN = 50
LOG_LINES = 40
ABSTAINS_LISTED = 100
BAND_ALPHA = 0.05  # the curves' Clopper-Pearson bands: 95%


class Cache:
    """The last result tables and curves built, each with the version of the rows it was built from
    (``repo.results_version``): built again only when a result was written or a job's state changed since. An
    experiment of 200,000 results takes seconds to tabulate; its version, two small queries."""

    def __init__(self, size: int = 16):
        self.size, self.found = size, OrderedDict()

    def get(self, session: Session, key: tuple, job_ids: list[int], build: Callable[[], dict]) -> dict:
        version = repo.results_version(session, job_ids)
        hit = self.found.get(key)
        if hit is not None and hit[0] == version:
            self.found.move_to_end(key)
            return hit[1]
        value = build()
        self.found[key] = (version, value)
        while len(self.found) > self.size:
            self.found.popitem(last=False)
        return value


def _built(cache: Cache | None, session: Session, key: tuple, job_ids: list[int], build: Callable[[], dict]):
    return build() if cache is None else cache.get(session, key, job_ids, build)


def queue(session: Session, now: datetime, stale_after: timedelta) -> dict:
    """The queue page: jobs as ``dsq jobs`` says them (with ``dsq status``'s progress line for unfinished
    certifications), workers and their heartbeats, experiments and their jobs' states."""
    listed = repo.list_jobs(session, limit=JOBS_SHOWN)
    records = views.job_records(session, listed, now, stale_after)
    for record, job in zip(records, listed):
        record["status"] = job.status
        record["detail"] = None if job.finished else views.progress_line(session, job, now)
    alive = {worker.id for worker in jobqueue.live_workers(session, stale_after, now=now)}
    workers = [{"name": w.name, "host": w.host, "pid": w.pid, "max_jobs": w.max_jobs,
                "heartbeat": f"{(now - w.heartbeat_at).total_seconds():.0f} s ago",
                "state": "stopped" if w.stopped_at else "alive" if w.id in alive else "stale"}
               for w in repo.recent_workers(session, WORKERS_SHOWN)]
    experiments = [{"name": name, "states": states} for name, states in repo.experiment_states(session).items()]
    return {"jobs": records, "workers": workers, "experiments": experiments}


def progress(session: Session) -> list[dict]:
    """The live poll: each recent job's status and progress, one small query."""
    return [{"id": job_id, "status": status, "progress": f"{done}/{total}"}
            for job_id, status, done, total in repo.queue_progress(session, JOBS_SHOWN)]


def job(session: Session, job_id: int, now: datetime, stale_after: timedelta, *, linf: bool = False,
        cache: Cache | None = None) -> dict:
    """A job's page: its state (``dsq status``), spec and models' provenance (``dsq show``), log tail, and results:
    the table ``dsq results JOB`` prints, the curve with its band, the images it abstained on."""
    record = repo.get_job(session, job_id)
    page = {"id": record.id, "name": record.name or "", "kind": views.kind_label(record), "status": record.status,
            "experiment": record.experiment, "describe": views.describe(session, record, now, stale_after),
            "show": views.show(session, record, now, stale_after),
            "log": [f"{line.created_at:%H:%M:%S} {line.level:5} {line.message}"
                    for line in repo.log_tail(session, job_id, LOG_LINES)]
            + ([record.traceback] if record.traceback else []),
            "results": None}
    if record.kind == "train" or not repo.count_results(session, job_id).stored:
        return page
    predicted = views.prediction(session, job_id)
    if predicted is not None:
        found, api, partial = predicted
        page["results"] = {"kind": "predict", "header": predictions.HEADER, "rows": predictions.text_rows(found),
                           "notes": predictions.summary_lines(found, api=api) + ([partial] if partial else [])}
        return page
    page["results"] = _built(cache, session, ("job", job_id, linf), [job_id],
                             lambda: results(session, job_id, linf=linf))
    page["abstained"] = repo.abstained_indices(session, job_id, ABSTAINS_LISTED)
    return page


def results(session: Session, job_id: int, *, linf: bool = False, ci: float | None = None) -> dict:
    """A certification's table as ``dsq results JOB`` builds it (a sequential job's: its one radius and costs),
    its records (``--format json --summary``), and its plot. Counted by the database; only a sequential job's rows
    are loaded (its costs are per image)."""
    sequential = views.sequential_costs(session, job_id)
    [report] = views.report_jobs(session, [job_id], rows=sequential is not None)
    if linf:
        [report] = views.in_linf(session, [report])
        sequential = sequential and (report.target, *sequential[1:])
    radii = [sequential[0]] if sequential else views.table_radii(session, [report], linf=linf)
    [report] = views.tallied(session, [report], radii)
    table = summary.build([report], radii, ci=ci)
    if linf:
        table = table._replace(notes=[*table.notes, views.linf_note([report])])
    found = {"kind": "sequential" if sequential else "fixed", "label": report.label, "images": report.images,
             "title": tables.accuracy_title(ci), "header": summary.header(table),
             "rows": summary.text_rows(table), "notes": table.notes, "records": summary.records(table),
             "radii": table.radii, "plot": curves.traces([report], radii, alpha=BAND_ALPHA),
             "norm": "L∞" if linf else "L2"}
    if sequential:
        target, unit, costs = sequential
        found.update(header=tables.sequential_header(unit),
                     rows=tables.sequential_table([(report.label, report.rows, costs)], target, ci=ci),
                     notes=[tables.sequential_note(target), *table.notes])
    return found


def job_json(session: Session, job_id: int, now: datetime, stale_after: timedelta, *,
             cache: Cache | None = None) -> str:
    """``/api/jobs/{id}`` as JSON text: the job as ``dsq jobs`` lists it, its table's records, and its per-image
    results as ``dsq results JOB --format json`` prints them (megabytes for 10,000 images: kept as text)."""
    record = repo.get_job(session, job_id)
    [listed] = views.job_records(session, [record], now, stale_after)
    table = None
    if record.kind != "train" and repo.count_results(session, job_id).stored and views.prediction(
            session, job_id) is None:
        table = _built(cache, session, ("job", job_id, False), [job_id], lambda: results(session, job_id))["records"]
    rows = _built(cache, session, ("job json", job_id), [job_id], lambda: json.dumps(exports.to_dicts(
        exports.export_rows(repo.results_for_job(session, job_id)), exports.EXPORT_FIELDS)))
    head = json.dumps({"job": {**listed, "status": record.status, "spec": record.spec, "meta": record.meta},
                       "table": table}, default=str)
    return f'{head[:-1]}, "results": {rows}}}'


def experiment(session: Session, name: str, *, linf: bool = False, ci: float | None = None,
               cache: Cache | None = None) -> dict:
    """An experiment's page: the tables of ``dsq results --experiment NAME --by-sigma`` and the curves of its jobs
    with each method's envelope; with ``ci``, intervals in the cells and a band around each curve."""
    def build() -> dict:
        report = views.experiment_report(session, name, by_sigma=True, ci=ci, linf=linf)
        return {"name": name, "title": report.title, "warning": report.warning, "notes": report.notes,
                "tables": [{"key": part.key, "title": part.title,
                            "header": summary.header(part.table, first="method"),
                            "rows": summary.text_rows(part.table)} for part in report.shown],
                "jobs": [{"id": job.job_id, "label": job.label, "method": job.method, "sigma": job.sigma}
                         for job in report.jobs],
                # a band per job: on a job's page; here only with ?ci= (a dozen bands hide the curves)
                "plot": curves.traces(report.jobs, report.radii, alpha=ci), "norm": "L∞" if linf else "L2"}

    return _built(cache, session, ("experiment", name, linf, ci), repo.experiment_job_ids(session, name), build)


def experiment_json(session: Session, name: str, *, by_sigma: bool = False, linf: bool = False,
                    ci: float | None = None, cache: Cache | None = None) -> dict:
    """``/api/experiments/{name}``: what ``dsq results --experiment NAME --format json`` prints."""
    def build() -> dict:
        return views.experiment_report(session, name, by_sigma=by_sigma, ci=ci, linf=linf).as_object()

    return _built(cache, session, ("experiment json", name, by_sigma, linf, ci),
                  repo.experiment_job_ids(session, name), build)


def image(session: Session, job_id: int, index: int, *, answers_from: int = 0) -> dict:
    """One image of a job: its certificate as stored (counts, p̲A, radius, samples), and what it says; a sequential
    job's p̲A against n up to the stop; a certify job's preview (noisy samples beside their denoised versions) or
    how to ask for one; a certify-api job's stored answers, ``ANSWERS_SHOWN`` from query ``answers_from`` on."""
    record = repo.get_job(session, job_id)
    row = repo.result_for_image(session, job_id, index)
    if row is None:
        raise JobNotFound(f"job {job_id} has no result for image {index}")
    [exported] = exports.export_rows([row])
    d = views.input_dimension(record.spec or {})
    selection, estimation = list(row.counts_selection or []), list(row.counts_estimation or [])
    counts = [{"class": c, "selection": _at(selection, c), "estimation": _at(estimation, c)}
              for c in range(max(len(selection), len(estimation))) if _at(selection, c) or _at(estimation, c)]
    extra = row.extra or {}
    found = repo.preview_for_image(session, job_id, index) if record.kind == "certify" else None
    return {"job": record.id, "job_name": record.name or "", "kind": record.kind, "index": index,
            "abstained": row.prediction == -1, "fields": exported, "counts": counts,
            "extra": {key: value for key, value in extra.items() if key not in LISTED_APART},
            "linf": None if d is None else row.radius / d ** 0.5,
            "verdict": _verdict(row, (record.spec or {}).get("radius")),
            "trace": _trace(row, extra.get("target_radius", (record.spec or {}).get("radius"))),
            "preview": None if found is None else {"url": f"/jobs/{job_id}/images/{index}/preview.png",
                                                   "classes": found.classes, "samples": found.samples,
                                                   "denoised": bool((record.spec or {}).get("denoiser"))},
            "answers": _answers(session, job_id, extra, answers_from) if record.kind == "certify_api" else None}


LISTED_APART = ("sha256", "trace")  # what the image page shows in its own sections, not in "stored with it"
ANSWERS_SHOWN = 100  # a certify-api image's stored answers per page: an image may have 10,000 queries


def preview_png(session: Session, job_id: int, index: int) -> bytes:
    """The stored preview of one image (a PNG); JobNotFound when there is none."""
    found = repo.preview_for_image(session, repo.get_job(session, job_id).id, index)
    if found is None:
        raise JobNotFound(f"job {job_id} has no preview of image {index}: dsq preview {job_id} {index} asks for one")
    return found.png


def _trace(row, target: float | None) -> dict | None:
    """A sequential image's p̲A at each look (``dsq.sequential.SequentialTest.trace``) as plot data, with the
    level it had to reach, p0 = Phi(r / sigma); ``recorded`` False for a row stored before traces were kept; None
    for an image of a job with no target radius."""
    if target is None:
        return None
    from scipy.special import ndtr  # loaded already by the curves' bands

    points = (row.extra or {}).get("trace")
    return {"n": [n for n, _ in points or []], "p_lower": [p for _, p in points or []], "target": target,
            "p0": float(ndtr(target / row.sigma)), "recorded": points is not None}


def _answers(session: Session, job_id: int, extra: dict, start: int) -> dict:
    """A certify-api image's queries from ``start`` on (``ANSWERS_SHOWN`` of them): which sample, the top label
    stored, when it was stored and by which job; with the total, so a 10,000-query image is one page of them."""
    digests = extra.get("sha256") or {}
    queries = ([("clean", 0, digests["clean"])] if digests.get("clean") else []) + [
        (phase, sample, digest) for phase in ("selection", "estimation")
        for sample, digest in enumerate(digests.get(phase) or [])]
    start = min(max(start, 0), max(len(queries) - 1, 0))
    shown = queries[start:start + ANSWERS_SHOWN]
    stored = repo.api_answers(session, extra.get("provider", ""), extra.get("service", ""),
                              [digest for _, _, digest in shown])
    rows = []
    for phase, sample, digest in shown:
        answer = stored.get(digest)
        rows.append({"phase": phase, "sample": sample, "sha256": digest[:12],
                     "label": None if answer is None else answer.top_label,
                     "stored": None if answer is None else f"{answer.created_at:%Y-%m-%d %H:%M:%S} UTC",
                     "paid_by": None if answer is None else answer.job_id})
    return {"total": len(queries), "start": start, "rows": rows, "page": ANSWERS_SHOWN, "job": job_id,
            "provider": extra.get("provider"), "service": extra.get("service")}


def _at(counts: list[int], c: int) -> int:
    return counts[c] if c < len(counts) else 0


def _verdict(row, target) -> str:
    if row.prediction == -1:
        return "abstained: the top class's lower bound p̲A did not pass 1/2" + (
            f" at the target radius {target:g}" if target is not None else "")
    if not row.correct:
        return f"wrong: predicted class {row.prediction}, label {row.label}"
    return f"certified: class {row.prediction} within L2 radius {row.radius:.4g}"
