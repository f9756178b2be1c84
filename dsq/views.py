"""What the read-only commands show: job states in the queue's words, result tables.

Nothing here imports torch or Ray, so ``dsq jobs``, ``status``, ``results`` and ``compare``
answer at once.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import NamedTuple

from sqlalchemy.orm import Session

from dsq import jobqueue, specs
from dsq.db import repo
from dsq.db.models import Job
from dsq.errors import JobStateError
from dsq.report import accuracy, envelopes, tables
from dsq.text import escape_controls, safe


def state(session: Session, job: Job, now: datetime, stale_after: timedelta, workers_alive: bool) -> str:
    """A job's status as a user needs it: stale, waiting for job N, queued at position P, ..."""
    if jobqueue.is_stale(job, stale_after, now):
        age = (now - (job.heartbeat_at or job.started_at)).total_seconds()
        then = "another worker takes it over" if workers_alive else f"start one (dsq worker) or dsq resume {job.id}"
        return f"stale (no heartbeat for {age:.0f} s: its worker is gone; {then})"
    if job.status != "queued":
        return job.status + (" (cancel requested)" if job.cancel_requested and job.status == "running" else "")
    waiting = jobqueue.unmet(session, job.id)
    if waiting:
        return "waiting for " + ", ".join(f"job {d.id} ({d.status})" for d in waiting)
    place = jobqueue.position(session, job)
    where = f"queued, position {place}" if place else "queued"
    return where if workers_alive else f"{where}; no worker alive (start one: dsq worker)"


def describe(session: Session, job: Job, now: datetime, stale_after: timedelta) -> list[str]:
    """Lines for ``dsq status`` (printed without markup): state, progress, rate and ETA (never for a stale job)."""
    alive = bool(jobqueue.live_workers(session, stale_after, now=now))
    title = f"job {job.id} ({job.kind}{', ' + escape_controls(job.name) if job.name else ''})"
    lines = [f"{title}: {state(session, job, now, stale_after, alive)}",
             f"priority {job.priority}" + (f", experiment {escape_controls(job.experiment)}" if job.experiment else ""),
             f"progress {job.progress_done}/{job.progress_total}, attempts {job.attempts}"
             + (f", runner {job.runner}" if job.runner and job.status == "running" else "")]
    stale = jobqueue.is_stale(job, stale_after, now)
    certifying = progress_line(session, job, now, live=not stale)
    if certifying:  # a certification: images, rate, certified so far and ETA in one line
        lines.append(certifying)
    elif job.started_at and job.progress_done and not stale:  # a training: its progress counts epochs
        per_epoch = _run_seconds(job, now) / job.progress_done
        eta = (job.progress_total - job.progress_done) * per_epoch
        lines.append(f"epoch {job.progress_done} of {job.progress_total} done · {_duration(per_epoch)} an epoch"
                     + (f" · ETA {_duration(eta)}" if job.status == "running" else ""))
    lines += filter(None, [api_spend_line(session, job.id)])
    if job.error:
        lines.append(f"error: {escape_controls(job.error)}")
    return lines


def api_spend_line(session: Session, job_id: int) -> str | None:
    """A certify-api job's spend (queries paid, answers reused, dollars) in a line; None for other kinds."""
    from dsq.kinds import certify_api

    return certify_api.spend(session, repo.get_job(session, job_id))


def progress_line(session: Session, job: Job, now: datetime, *, live: bool = True) -> str | None:
    """A certification's progress: ``12/30 images · 1.8 img/s · certified 58% · ETA 10 s``; None for a training.

    The rate is this run's: images stored since the job last started. Certified is the share of the images stored
    that are correct and certified: radius > 0, or for a sequential job radius >= its target (named in the line).
    ``live`` False (a stale job) leaves the rate and ETA out, as does a job queued again.
    """
    if job.kind == "train":
        return None
    target = (job.spec or {}).get("radius")
    counts = repo.count_results(session, job.id, radius=target or 0.0, since=job.started_at)
    parts = [f"{job.progress_done}/{job.progress_total} images"]
    rate = 0.0
    if live and job.status != "queued" and counts.since:
        rate = counts.since / max(_run_seconds(job, now), 1e-9)
        parts.append(f"{rate:.1f} img/s" if rate >= 0.1 else f"{rate:.2g} img/s")
    if counts.stored:
        at = "" if target is None else f" at r = {target:g}"
        parts.append(f"certified {100 * counts.certified / counts.stored:.0f}%{at}")
    if rate and job.status == "running":
        parts.append(f"ETA {_duration(max(job.progress_total - job.progress_done, 0) / rate)}")
    return " · ".join(parts)


def _run_seconds(job: Job, now: datetime) -> float:
    """How long this run took or has taken so far (since the job last started)."""
    return ((job.finished_at or now) - job.started_at).total_seconds()


def _duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``3 h 5 min``."""
    whole = round(seconds)
    if whole < 120:
        return f"{whole} s"
    return f"{whole // 60} min" if whole < 7200 else f"{whole // 3600} h {whole % 3600 // 60} min"


def show(session: Session, job: Job) -> list[str]:
    """Lines for ``dsq show``: the spec, what the job waits for or produced, its models and their metrics."""
    lines = [f"job {job.id}: {job.kind}, {job.status}" + (f", name {escape_controls(job.name)}" if job.name else ""),
             f"created {job.created_at:%Y-%m-%d %H:%M:%S} UTC, priority {job.priority}, attempts {job.attempts}"
             + (f", experiment {escape_controls(job.experiment)}" if job.experiment else "")]
    if (job.meta or {}).get("overrides"):
        from dsq.experiments import changed_by_set

        lines.append(escape_controls(changed_by_set(job.meta["overrides"])))
    lines += ["spec:"] + [f"  {key} = {escape_controls(repr(value))}" for key, value in sorted((job.spec or {}).items())
                          if key != "models"]
    models = (job.spec or {}).get("models") or {}
    lines += ["  models:"] if models else []
    for reference, options in models.items():  # each user model's options, one a line
        lines.append(f"    {escape_controls(reference)}:")
        lines += [f"      {key} = {escape_controls(repr(value))}" for key, value in sorted(options.items())]
    if (job.spec or {}).get("classes"):
        lines.append(f"class order: {escape_controls(specs.class_order(job.spec['classes']))}")
    depends = jobqueue.dependencies(session, job.id)
    if depends:
        lines.append("depends on: " + ", ".join(f"job {d.id} ({d.status})" for d in depends))
    for key in ("classifier", "denoiser", "init", "surrogates"):
        for reference in _as_list((job.spec or {}).get(key)):
            lines.append(f"{key}: {escape_controls(reference)}" + _model_metrics(session, reference))
    for artifact in repo.artifacts_for_job(session, job.id):
        lines.append(f"artifact {escape_controls(artifact.name)}: {artifact.location} (sha256 {artifact.sha256[:12]})"
                     + _metrics_text(artifact.metrics))
    lines += filter(None, [api_spend_line(session, job.id)])
    if job.error:
        lines.append(f"error: {escape_controls(job.error)}")
    return lines


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value] if value else []


def _model_metrics(session: Session, reference: str) -> str:
    if not (reference.startswith("job:") and reference[4:].isdigit()):
        return ""
    found = repo.artifacts_for_job(session, int(reference[4:]))
    return _metrics_text(found[0].metrics) if found else " (not trained yet)"


def _metrics_text(metrics: dict | None) -> str:
    shown = {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return (" — " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(shown.items()))) if shown else ""


def job_rows(session: Session, jobs: list[Job], now: datetime, stale_after: timedelta) -> list[list[str]]:
    """Rows for ``dsq jobs``: id, kind, name, state, priority, progress, created."""
    alive = bool(jobqueue.live_workers(session, stale_after, now=now))
    return [[str(job.id), job.kind, safe(job.name or ""), state(session, job, now, stale_after, alive),
             str(job.priority), f"{job.progress_done}/{job.progress_total}", f"{job.created_at:%Y-%m-%d %H:%M:%S}"]
            for job in jobs]


def labelled_results(session: Session, job_ids) -> list[tuple[str, list]]:
    """(label, per-image results) for each job, label = its name or ``job N``."""
    labelled = []
    for job_id in job_ids:
        job = repo.get_job(session, job_id)
        rows = accuracy.as_results(repo.results_for_job(session, job_id))
        if not rows and job.kind == "train":
            raise JobStateError(f"job {job_id} is a training: it has a model, not certified images "
                                f"(dsq show {job_id} says what it trained)")
        if not rows:
            raise JobStateError(f"job {job_id} has no results yet (status {job.status})")
        precision = (job.spec or {}).get("precision", "fp32")  # reduced precision changes f: say so
        label = job.name or f"job {job.id}"
        label = label if precision == "fp32" else f"{label} ({precision})"
        target = (job.spec or {}).get("radius")  # a sequential job answers only at its target: say so
        labelled.append((label if target is None else f"{label} (sequential, r = {target:g})", rows))
    return labelled


def sequential_costs(session: Session, job_id: int) -> tuple[float, str, list[int]] | None:
    """A sequential job's target radius, its cost unit and each image's cost, by image; None for a fixed n.

    The cost is the estimation samples drawn, or for a certify-api job the queries billed (n0 + n + 1:
    each paid at most once, fewer when stored answers were reused).
    """
    job = repo.get_job(session, job_id)
    target = (job.spec or {}).get("radius")
    if target is None:
        return None
    rows = repo.results_for_job(session, job_id)
    if job.kind == "certify_api":
        return float(target), "queries", [row.n0 + row.n + 1 for row in rows]
    return float(target), "samples", [row.n for row in rows]


def sequential_summary(label: str, rows, target: float, unit: str, costs: list[int], ci: float | None = None):
    """The rich table of a sequential job: certified accuracy at its target and what an image cost."""
    table = tables.sequential_table([(label, rows, costs)], target, ci=ci)
    return tables.render_table(tables.sequential_header(unit), table,
                               title=f"{label}: certified accuracy % at radius {target:g}, {len(rows)} images")


class Run(NamedTuple):
    """A compared job: id, label (``labelled_results``), results, method (the label without its sigma), sigma."""

    job_id: int
    label: str
    rows: list
    method: str
    sigma: float | None


def compared_runs(session: Session, job_ids) -> list[Run]:
    """The jobs to compare, each with its method: its label without the sigma (``envelopes.split_sigma``).

    Jobs of one method differ only in sigma, e.g. an experiment's ``MSE s=0.25`` and ``MSE s=0.5``; the sigma is
    the job's own (its spec's), else the one its name gives.
    """
    runs = []
    for job_id, (label, rows) in zip(job_ids, labelled_results(session, job_ids)):
        method, named = envelopes.split_sigma(label)
        sigma = (repo.get_job(session, job_id).spec or {}).get("sigma", named)
        runs.append(Run(job_id, label, rows, method, None if sigma is None else float(sigma)))
    return runs


def comparison_rows(runs: list[Run], radii, *, envelope: bool = False, ci: float | None = None,
                    images: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one per job and, with ``envelope``, one per method of several jobs (the best across sigma).

    ``ci`` (an alpha) adds Clopper-Pearson intervals; ``images`` a column with each row's number of images (an
    envelope's, when its jobs certified different numbers of images: ``30-50``).
    """
    rows = tables.compare_table([(run.label, run.rows) for run in runs], radii, ci=ci)
    counts = [str(len(run.rows)) for run in runs]
    groups: dict[str, list[Run]] = {}
    for run in runs if envelope else []:
        groups.setdefault(run.method, []).append(run)
    for method, group in groups.items():
        if len(group) < 2:
            continue  # one job is its own envelope
        label = f"envelope: {method}" if method else "envelope"
        rows.append(tables.envelope_row([(run.label, run.rows) for run in group], radii, label=label, ci=ci))
        sizes = sorted({len(run.rows) for run in group})
        counts.append(f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}")
    header = tables.compare_header(radii)
    if images:
        header.insert(1, "images")
        rows = [[row[0], count, *row[1:]] for row, count in zip(rows, counts)]
    return header, rows


def image_warning(runs: list[Run]) -> str | None:
    """A warning line when the jobs certified different images (their numbers are then not comparable)."""
    sets: dict[int, set[int]] = {}
    for run in runs:
        sets.setdefault(run.job_id, {row.image_index for row in run.rows})
    if len({frozenset(found) for found in sets.values()}) < 2:
        return None
    common = set.intersection(*sets.values())
    return ("warning: jobs certified different images: "
            + ", ".join(f"job {job_id} has {len(found)}" for job_id, found in sets.items())
            + f" ({len(common)} in common)")


def comparison(labelled, radii, *, title: str, ci: float | None = None, first: str = "job"):
    """A rich table: a row per (label, rows); ``first`` names the label column."""
    return tables.render_table(tables.compare_header(radii, first), tables.compare_table(labelled, radii, ci=ci),
                               title=title)


def experiment_runs(session: Session, experiment: str) -> dict[str, list[tuple[float, str, list]]]:
    """Per method of an experiment, its certify jobs with results: (sigma, label, rows), by sigma."""
    jobs = repo.list_jobs(session, limit=100_000, kind="certify", experiment=experiment)
    jobs += repo.list_jobs(session, limit=100_000, kind="certify_api", experiment=experiment)
    if not jobs:
        raise JobStateError(f"no certify jobs in experiment {experiment!r}")
    runs: dict[str, list] = {}
    for job in sorted(jobs, key=lambda j: j.id):
        rows = accuracy.as_results(repo.results_for_job(session, job.id))
        meta = job.meta or {}
        if rows:
            runs.setdefault(meta.get("method", job.name or f"job {job.id}"), []).append(
                (meta.get("sigma", job.spec.get("sigma")), job.name or f"job {job.id}", rows))
    if not runs:
        raise JobStateError(f"experiment {experiment!r} has no results yet")
    return {method: sorted(found, key=lambda run: run[0]) for method, found in runs.items()}


def experiment_tables(runs: dict, radii, *, by_sigma: bool = False, ci: float | None = None) -> list:
    """The paper's table (per method, the envelope across sigma), and per-sigma tables on request.

    ``ci`` (an alpha) adds Clopper-Pearson intervals over the images to every cell.
    """
    shown = []
    what = tables.accuracy_title(ci)
    if by_sigma:
        for sigma in sorted({s for found in runs.values() for s, _, _ in found}):
            labelled = [(method, rows) for method, found in runs.items() for s, _, rows in found if s == sigma]
            shown.append(comparison(labelled, radii, title=f"sigma = {sigma:g}: {what}", ci=ci, first="method"))
    envelope = [tables.envelope_row([(label, rows) for _, label, rows in found], radii, label=safe(method), ci=ci)
                for method, found in runs.items()]
    shown.append(tables.render_table(tables.compare_header(radii, "method"), envelope,
                                     title=f"envelope across sigma: best {what}"))
    return shown


def partial_note(session: Session, job_id: int, stored: int) -> str | None:
    """A warning line when a job's numbers are not final: it is not done, or it ended before every image."""
    job = repo.get_job(session, job_id)
    if job.status == "succeeded" and stored >= job.progress_total:
        return None
    return (f"partial: {stored} of {job.progress_total} images, job {job.status}"
            + ("" if job.finished else "; the numbers will change"))
