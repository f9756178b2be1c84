"""What the read-only commands show: job states in the queue's words, result tables.

Nothing here imports torch or Ray, so ``dsq jobs``, ``status``, ``results`` and ``compare``
answer at once.
"""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import datetime, timedelta
from typing import NamedTuple

from sqlalchemy.orm import Session

from dsq import jobqueue, specs
from dsq.db import repo
from dsq.db.models import Job, Worker
from dsq.errors import InvalidArgument, JobStateError
from dsq.report import accuracy, envelopes, exports, predictions, summary, tables
from dsq.text import escape_controls, safe


def state(session: Session, job: Job, now: datetime, stale_after: timedelta, workers: list[Worker]) -> str:
    """A job's status as a user needs it: stale, waiting for job N, retrying in S s, waiting for a GPU, no worker,
    queued at position P, ... (``workers``: the live ones, ``jobqueue.live_workers``)."""
    if jobqueue.is_stale(job, stale_after, now):
        age = (now - (job.heartbeat_at or job.started_at)).total_seconds()
        then = "another worker takes it over" if workers else f"start one (dsq worker) or dsq resume {job.id}"
        return f"stale (no heartbeat for {age:.0f} s: its worker is gone; {then})"
    if job.status != "queued":
        return job.status + (" (cancel requested)" if job.cancel_requested and job.status == "running" else "")
    waiting = jobqueue.unmet(session, job.id)
    if waiting:
        return "waiting for " + ", ".join(f"job {d.id} ({d.status})" for d in waiting)
    if job.not_before is not None and job.not_before > now:
        attempt = jobqueue.used_attempts(session, job.id) + 1
        return (f"retrying in {math.ceil((job.not_before - now).total_seconds())} s "
                f"(attempt {attempt} of {job.max_attempts})")
    place = jobqueue.position(session, job, now)
    where = f"queued, position {place}" if place else "queued"
    if not workers:
        return f"{where}; no worker serves this database (start one: dsq worker)"
    return short_of(job, workers) or where


def short_of(job: Job, workers: list[Worker]) -> str | None:
    """What a runnable job waits for when the live workers' clusters lack what it holds once running (``None``: it
    waits for its turn): "waiting for a GPU (needs 1; the cluster has 0 free)".

    Read from what workers record (their cluster grown to their autoscaling cap, and what their jobs leave free, as
    of their last heartbeat), so it needs neither Ray nor torch.
    """
    from dsq import kinds

    offered = [w for w in workers if w.resources]
    if not offered:
        return None
    demand = kinds.get(job.kind).demand(kinds.from_dict(job.spec), max(offered, key=_gpus).resources)
    for resource, words in (("GPU", "a GPU"), ("CPU", "a CPU")):
        need, total = demand.get(resource, 0.0), max(w.resources.get(resource, 0.0) for w in offered)
        free = max((w.free or w.resources).get(resource, 0.0) for w in offered)
        if need > free + 1e-9 and (resource == "GPU" or free < total):  # alone on a cluster, a job runs anyway
            what = words if need == 1 else f"{resource}s"
            return f"waiting for {what} (needs {need:g}; the cluster has {free:g} free)"
    return None


def _gpus(worker: Worker) -> float:
    return (worker.resources or {}).get("GPU", 0.0)


def describe(session: Session, job: Job, now: datetime, stale_after: timedelta) -> list[str]:
    """Lines for ``dsq status`` (printed without markup): state, progress, rate and ETA (never for a stale job)."""
    alive = jobqueue.live_workers(session, stale_after, now=now)
    title = f"job {job.id} ({job.kind}{', ' + escape_controls(job.name) if job.name else ''})"
    lines = [f"{title}: {state(session, job, now, stale_after, alive)}",
             f"priority {job.priority}" + (f", experiment {escape_controls(job.experiment)}" if job.experiment else ""),
             f"progress {job.progress_done}/{job.progress_total}, "
             f"attempts used {jobqueue.used_attempts(session, job.id)} of {job.max_attempts}"
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


def attempt_lines(session: Session, job: Job) -> list[str]:
    """Each run of a job, one a line: ``attempt 2 of 3 on W, 10:02:11-10:02:40 UTC: died: worker W died: ...``.
    A run handed back (a clean stop) or run before a resume does not count against ``max_attempts``."""
    lines = []
    for run in jobqueue.attempts(session, job.id):
        until = f"-{run.ended_at:%H:%M:%S}" if run.ended_at else ""
        note = "" if run.counts or run.outcome not in jobqueue.COUNTED else " (before a resume)"
        lines.append(f"attempt {run.number} of {job.max_attempts} on {escape_controls(run.worker)}, "
                     f"{run.started_at:%Y-%m-%d %H:%M:%S}{until} UTC: {run.outcome}{note}"
                     + (f": {escape_controls(run.error)}" if run.error else ""))
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


def show(session: Session, job: Job, now: datetime, stale_after: timedelta) -> list[str]:
    """Lines for ``dsq show``: the spec, what the job waits for or produced, its attempts, models and metrics."""
    alive = jobqueue.live_workers(session, stale_after, now=now)
    lines = [f"job {job.id}: {kind_label(job)}, {state(session, job, now, stale_after, alive)}"
             + (f", name {escape_controls(job.name)}" if job.name else ""),
             f"created {job.created_at:%Y-%m-%d %H:%M:%S} UTC, priority {job.priority}, "
             f"at most {job.max_attempts} attempt(s)"
             + (f", experiment {escape_controls(job.experiment)}" if job.experiment else "")]
    if (job.meta or {}).get("overrides"):
        from dsq.experiments import changed_by_set

        lines.append(escape_controls(changed_by_set(job.meta["overrides"])))
    lines += ["spec:"] + [f"  {key} = {escape_controls(repr(value))}" for key, value in sorted((job.spec or {}).items())
                          if key not in ("models", "uploads")]
    uploads = (job.spec or {}).get("uploads") or {}
    lines += ["  uploads (where the job reads them):"] if uploads else []
    for path, entry in sorted(uploads.items()):  # each file or folder named by path, and its copy in the store
        lines.append(f"    {escape_controls(path)}: {escape_controls(str(entry.get('location')))} "
                     f"(sha256 {str(entry.get('sha256'))[:12]})")
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
        schedule = (artifact.metrics or {}).get("diffusion")
        if isinstance(schedule, dict):
            lines.append(f"diffusion: {schedule.get('schedule')} schedule, T = {schedule.get('timesteps')} (beta "
                         f"{schedule.get('beta_start'):g} to {schedule.get('beta_end'):g}); a denoiser at every sigma")
    lines += filter(None, [api_spend_line(session, job.id)])
    lines += attempt_lines(session, job)
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


JOB_COLUMNS = ("id", "kind", "name", "state", "priority", "progress", "created")


def job_records(session: Session, jobs: list[Job], now: datetime, stale_after: timedelta) -> list[dict]:
    """What ``dsq jobs`` says of each job (``JOB_COLUMNS``), as text; the name as the user wrote it."""
    alive = jobqueue.live_workers(session, stale_after, now=now)
    return [dict(zip(JOB_COLUMNS, (str(job.id), kind_label(job), job.name or "",
                                   state(session, job, now, stale_after, alive), str(job.priority),
                                   f"{job.progress_done}/{job.progress_total}",
                                   f"{job.created_at:%Y-%m-%d %H:%M:%S}"))) for job in jobs]


def job_rows(session: Session, jobs: list[Job], now: datetime, stale_after: timedelta) -> list[list[str]]:
    """Rows for ``dsq jobs`` (``job_records``), fit for a terminal."""
    return [[safe(value) if key == "name" else value for key, value in record.items()]
            for record in job_records(session, jobs, now, stale_after)]


def kind_label(job: Job) -> str:
    """A job's kind as the CLI shows it: PREDICT is a mode of ``certify`` and ``certify_api``, said beside them."""
    return f"{job.kind} (PREDICT)" if predictions.is_prediction(job.spec) else job.kind


def labelled_results(session: Session, job_ids) -> list[tuple[str, list]]:
    """(label, per-image results) for each job (``report_jobs``)."""
    return [(job.label, job.rows) for job in report_jobs(session, job_ids)]


# How a default name calls a denoiser by its training objective (dsq.specs.DENOISER_OBJECTIVES).
OBJECTIVE_NAMES = {"mse": "MSE", "stab": "STAB", "stab_mse": "STAB+MSE", "clf": "CLF",
                   "diffusion": "diffusion (one-shot)"}


def report_jobs(session: Session, job_ids, *, rows: bool = True) -> list[summary.Job]:
    """The jobs to report, with their results, label, method, sigma, sequential target, cap and partial note.
    ``rows`` False loads no result (``rows`` None) and leaves the partial note to ``tallied``, which counts them in
    the database.

    A job's label is its name, else a default name from its spec (``default_method`` and sigma); its method is
    that name without the sigma (``envelopes.split_sigma``), and a reduced precision's. Its sequential target is
    said in its label but leaves its method alone: an envelope takes it where it answers. Default names shared by
    several jobs get their id.
    """
    found = []
    listed = [repo.get_job(session, job_id) for job_id in job_ids]  # an id no job has: JobNotFound, before any count
    stored = repo.with_results(session, job_ids)
    for job_id, job in zip(job_ids, listed):
        spec = job.spec or {}
        rows = _results(session, job, job_id in stored, load=rows)
        sigma = spec.get("sigma")
        if job.name:
            method, named = envelopes.split_sigma(job.name)
            label, sigma = job.name, sigma if sigma is not None else named
        else:
            method = default_method(session, job)
            label = method if sigma is None else f"{method} σ={sigma:g}"
        precision = spec.get("precision", "fp32")  # reduced precision changes f: say so (another method)
        if precision != "fp32":
            label, method = f"{label} ({precision})", f"{method} ({precision})"
        target = spec.get("radius")  # a sequential job answers only at its target: say so
        label = label if target is None else f"{label} (sequential, r = {target:g})"
        found.append(summary.Job(label, rows, method, None if sigma is None else float(sigma),
                                 None if target is None else float(target), _cap(spec),
                                 None if rows is None else partial_note(session, job_id, len(rows)), job_id))
    labels = [job.label for job in found]
    return [job._replace(label=f"{job.label} (job {job.job_id})")
            if labels.count(job.label) > 1 and not repo.get_job(session, job.job_id).name else job for job in found]


def _results(session: Session, job: Job, stored: bool, *, load: bool = True) -> list | None:
    """A job's results (None when not ``load``ed; ``stored``: it has some); a job with none, a training, a preview
    and a PREDICT job are refused."""
    if predictions.is_prediction(job.spec):  # its rows have no radius: no certified-accuracy table may count them
        raise JobStateError(f"job {job.id} is a PREDICT job: a class or an abstain per image, no radius to "
                            f"compare (dsq results {job.id} shows its answers)")
    rows = accuracy.as_results(repo.result_fields(session, job.id)) if load else None
    if not load and stored:
        return None
    if not rows and job.kind == "train":
        raise JobStateError(f"job {job.id} is a training: it has a model, not certified images "
                            f"(dsq show {job.id} says what it trained)")
    if not rows and job.kind == "preview":
        raise JobStateError(f"job {job.id} is a preview of image {job.spec['image']} of job {job.spec['job']}: "
                            f"pictures, not radii (its image's page on the dashboard shows them)")
    if not rows:
        raise JobStateError(f"job {job.id} has no results yet (status {job.status})")
    return rows


# A curve of certified accuracy (the dashboard's) has CURVE_POINTS steps from 0 to CURVE_MARGIN times the largest
# certified radius (or sequential target), and CURVE_FLOOR at least: the steps of the jobs' tallies.
CURVE_POINTS, CURVE_MARGIN, CURVE_FLOOR = 200, 1.05, 0.5


def curve_end(largest, targets=()) -> float:
    """Where a curve's radius axis ends, given the largest certified radii and the sequential targets."""
    return max(CURVE_FLOOR, max([*largest, *targets], default=0.0) * CURVE_MARGIN)


def tallied(session: Session, jobs: list[summary.Job], radii) -> list[summary.Job]:
    """The jobs with their ``tally`` at ``radii`` and at their sequential targets, counted by the database (a few
    queries per image size in L∞), with their correct images in the CURVE_POINTS steps of ``curve_end``: what their
    table lines and curves say, the same whether their rows were loaded or not; and their partial notes, from the
    results counted."""
    radii = sorted({*radii, *(job.target for job in jobs if job.target is not None)})
    scales = {d: None if d is None else 1 / math.sqrt(d) for d in {job.dimension for job in jobs}}
    largest = {}
    for d, scale in scales.items():
        largest.update(repo.largest_radii(session, [job.job_id for job in jobs if job.dimension == d], scale))
    end = curve_end(largest.values(), [job.target for job in jobs if job.target is not None])
    found: dict[int, accuracy.Tally] = {}
    for d, scale in scales.items():
        ids = [job.job_id for job in jobs if job.dimension == d]
        found.update(repo.result_tallies(session, ids, radii, scale, CURVE_POINTS / end, largest))
    return [job._replace(tally=found[job.job_id], partial=partial_note(session, job.job_id, found[job.job_id].n))
            for job in jobs]


def default_method(session: Session, job: Job) -> str:
    """What an unnamed certification does, from its spec: ``STAB+MSE (white-box)``, ``no denoiser``, ..."""
    spec = job.spec or {}
    denoiser = spec.get("denoiser")
    if denoiser:
        trained = _trained_spec(session, denoiser)
        if trained is None and str(denoiser).startswith("diffusers:"):
            method = f"diffusion (one-shot) {str(denoiser).rstrip('/').rsplit('/', 1)[-1]}"
        elif trained is None:
            method = f"denoiser {str(denoiser).rstrip('/').rsplit('/', 1)[-1]}"
        else:
            objective = trained.get("objective", "")
            method = OBJECTIVE_NAMES.get(objective, objective)
            against = "white-box" if trained.get("classifier") else "black-box" if trained.get("surrogates") else None
            method += f" ({against})" if against else ""
    else:
        trained = _trained_spec(session, spec.get("classifier"))
        method = "Gaussian training" if (trained or {}).get("objective") == "gaussian" else "no denoiser"
    return f"{spec['provider']} API, {method}" if job.kind == "certify_api" and spec.get("provider") else method


def _trained_spec(session: Session, reference) -> dict | None:
    """The spec of the training a ``job:N`` reference names; None for anything else."""
    if not (isinstance(reference, str) and reference.startswith("job:") and reference[4:].isdigit()):
        return None
    trained = session.get(Job, int(reference[4:]))
    return None if trained is None else trained.spec or {}


def _cap(spec: dict) -> float | None:
    """The largest radius a fixed-n certification can give (``bounds.max_radius``); None if sequential or unknown."""
    from dsq import bounds  # scipy.special only

    if spec.get("radius") is not None or not all(k in spec for k in ("n", "alpha", "sigma")):
        return None
    try:
        return bounds.max_radius(spec["n"], spec["alpha"], spec["sigma"])
    except InvalidArgument:
        return None


def stored_radii(session: Session, job_ids) -> list[float] | None:
    """The radii of the experiment file the jobs came from (stored with each job), when they all share them."""
    found = {tuple((repo.get_job(session, job_id).meta or {}).get("radii") or ()) for job_id in job_ids}
    return list(found.pop()) if len(found) == 1 and () not in found else None


def table_radii(session: Session, jobs: list[summary.Job], *, linf: bool = False) -> list[float]:
    """Default radii: the experiment file's (with every sequential job's target: the one radius it answers), else
    from 0 to the largest radius the jobs can certify. ``linf``: the jobs are in L∞ (``in_linf``); a file's radii
    are L2, so only the second rule applies."""
    stored = None if linf else stored_radii(session, [job.job_id for job in jobs])
    if stored:
        return sorted({*stored, *(job.target for job in jobs if job.target is not None)})
    return summary.auto_radii([job.cap for job in jobs if job.cap is not None],
                              [job.target for job in jobs if job.target is not None], accuracy.DEFAULT_RADII)


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


def envelope_groups(jobs: list[summary.Job]) -> list[tuple[str, list[summary.Job]]]:
    """(label, jobs) per method of several jobs: what ``--envelope`` adds (one job is its own envelope)."""
    return [(f"envelope: {method}" if method else "envelope", group) for method, group in by_method(jobs).items()
            if len(group) > 1]


def by_method(jobs: list[summary.Job]) -> dict[str, list[summary.Job]]:
    """The jobs of each method, in the order of their first job."""
    groups: dict[str, list[summary.Job]] = {}
    for job in jobs:
        groups.setdefault(job.method, []).append(job)
    return groups


def envelope_warning(jobs: list[summary.Job]) -> str:
    methods = sorted({job.method for job in jobs})
    return (f"warning: --envelope has nothing to combine: no two jobs share a method (a name without its sigma): "
            f"{', '.join(methods)}")


def image_warning(runs: list[summary.Job], session: Session | None = None) -> str | None:
    """A warning line when the jobs certified different images (their numbers are then not comparable). A job
    counted without its rows (``tallied``) whose images are one run of indices is that run; another's are read
    (``session``)."""
    spans = {run.job_id: (run.tally.first, run.tally.last) for run in runs if run.rows is None
             and run.tally.last - run.tally.first + 1 == run.tally.n}
    if len(spans) == len({run.job_id for run in runs}):  # all runs of indices: compared without sets
        if len(set(spans.values())) < 2:
            return None
    sets: dict[int, set[int]] = {}
    for run in runs:
        if run.job_id in sets:
            continue
        if run.rows is not None:
            sets[run.job_id] = {row.image_index for row in run.rows}
        elif run.job_id in spans:
            sets[run.job_id] = set(range(spans[run.job_id][0], spans[run.job_id][1] + 1))
        else:
            sets[run.job_id] = repo.done_image_indices(session, run.job_id)
    if len({frozenset(found) for found in sets.values()}) < 2:
        return None
    common = set.intersection(*sets.values())
    return ("warning: jobs certified different images: "
            + ", ".join(f"job {job_id} has {len(found)}" for job_id, found in sets.items())
            + f" ({len(common)} in common)")


class ExperimentTable(NamedTuple):
    """One table of an experiment: its key in CSV and JSON rows (``sigma=0.25``, ``envelope``), its title, and the
    ``summary.Table`` every format prints."""

    key: str
    title: str
    table: summary.Table


def experiment_jobs(session: Session, experiment: str, *, rows: bool = True) -> list[summary.Job]:
    """An experiment's certifications with results, as ``report_jobs`` reports them (label, sequential target, cap,
    partial note; their results unless not ``rows``), with the method and sigma of its file; by method (in the
    order of their first job), then sigma.

    A job submitted with ``--experiment`` but not from a file has no method there: its name without its sigma is.
    """
    listed = _experiment_jobs(session, experiment)
    stored = repo.with_results(session, [job.id for job in listed])
    found = [job for job in listed if job.id in stored]
    if not found:
        raise JobStateError(f"experiment {experiment!r} has no results yet")
    jobs = []
    for job, report in zip(found, report_jobs(session, [job.id for job in found], rows=rows)):
        meta = job.meta or {}
        sigma = meta.get("sigma", report.sigma)
        jobs.append(report._replace(method=meta.get("method", report.method),
                                    sigma=None if sigma is None else float(sigma)))
    return [job for group in by_method(jobs).values()
            for job in sorted(group, key=lambda job: math.inf if job.sigma is None else job.sigma)]


def _experiment_jobs(session: Session, experiment: str) -> list[Job]:
    """The certifications of an experiment, by id; none is JobStateError."""
    jobs = repo.list_jobs(session, limit=100_000, kind="certify", experiment=experiment)
    jobs += repo.list_jobs(session, limit=100_000, kind="certify_api", experiment=experiment)
    if not jobs:
        raise JobStateError(f"no certify jobs in experiment {experiment!r}")
    return sorted(jobs, key=lambda j: j.id)


def experiment_tables(jobs: list[summary.Job], radii, *, by_sigma: bool = False, by_class: bool = False,
                      ci: float | None = None) -> list[ExperimentTable]:
    """The paper's table (a row per method: its envelope across sigma), after a table per sigma on request.

    Rows are labelled by method, as in the paper; a sequential job's keeps its mark. Each is a ``summary.Table``
    as ``dsq compare`` builds it (ACR, abstain rate, classes, not-answered and capped cells, partial jobs). The
    envelope table, last, holds every job: its notes are the experiment's.
    """
    what = tables.accuracy_title(ci)
    shown = []
    if by_sigma:
        for sigma in sorted({job.sigma for job in jobs if job.sigma is not None}):
            rows = [job._replace(label=_method_label(job.method, [job])) for job in jobs if job.sigma == sigma]
            shown.append(ExperimentTable(f"sigma={sigma:g}", f"sigma = {sigma:g}: {what}",
                                         summary.build(rows, radii, ci=ci, by_class=by_class)))
    envelopes = [(_method_label(method, group), group) for method, group in by_method(jobs).items()]
    shown.append(ExperimentTable("envelope", f"envelope across sigma: best {what}",
                                 summary.build([], radii, ci=ci, by_class=by_class, envelopes=envelopes)))
    return shown


def _method_label(method: str, jobs: list[summary.Job]) -> str:
    """A method's row label, marked as ``report_jobs`` marks a sequential job when every job of the row is one."""
    targets = {job.target for job in jobs}
    if None in targets:
        return method
    return f"{method} (sequential, r = {', '.join(f'{t:g}' for t in sorted(targets))})"


class ExperimentReport(NamedTuple):
    """What ``dsq results --experiment`` prints and the dashboard shows: the jobs, the radii, the tables, the notes
    under the last (the experiment's), and a warning when the jobs certified different images."""

    name: str
    jobs: list[summary.Job]
    radii: list[float]
    shown: list[ExperimentTable]
    notes: list[str]
    warning: str | None
    ci: float | None

    @property
    def title(self) -> str:
        return f"experiment {self.name}: {tables.accuracy_title(self.ci)}"

    def records(self) -> list[dict]:
        """Every table's records (``summary.records``), each saying its table: one data set for CSV and JSON."""
        return [{"table": part.key, **record} for part in self.shown for record in summary.records(part.table)]

    def as_object(self) -> dict:
        """The JSON object of ``dsq results --experiment NAME --format json``."""
        return exports.table_object(self.title, self.radii, self.records(), self.notes)


def experiment_report(session: Session, name: str, radii: list[float] | None = None, *, by_sigma: bool = False,
                      by_class: bool = False, ci: float | None = None, linf: bool = False,
                      rows: bool = False) -> ExperimentReport:
    """An experiment's jobs (``experiment_jobs``, in L∞ with ``linf``) and tables (``experiment_tables``) at
    ``radii`` (default: ``table_radii``). Their lines are counted by the database (``tallied``); the rows are
    loaded only for ``by_class`` or when asked (``rows``: to draw them)."""
    jobs = experiment_jobs(session, name, rows=rows or by_class)
    if linf:
        jobs = in_linf(session, jobs)
    radii = list(radii or table_radii(session, jobs, linf=linf))
    jobs = tallied(session, jobs, radii)
    shown = experiment_tables(jobs, radii, by_sigma=by_sigma, by_class=by_class, ci=ci)
    # the envelope table, last, holds every job: its notes are the experiment's (the others' repeat them in part)
    notes = [*shown[-1].table.notes, *([linf_note(jobs)] if linf else [])]
    return ExperimentReport(name, jobs, radii, shown, notes, image_warning(jobs, session), ci)


# The image shape (C, H, W) noise is added to, per dataset (dsq.datasets.dataset_info says the same, but imports
# torch); imagenet's side is the spec's size, 224 by default.
DATASET_SHAPES = {"digits": (1, 8, 8), "cifar10": (3, 32, 32), "imagenet": (3, 224, 224)}


def input_dimension(spec: dict) -> int | None:
    """d, the number of pixel values of a job's images (C x H x W); None when the spec does not say it (a folder
    without ``size``, image files, an API job's own images)."""
    dataset = str(spec.get("dataset") or "")
    channels, height, width = DATASET_SHAPES.get(dataset, (None, None, None))
    if spec.get("size") and (dataset == "imagenet" or dataset.startswith("folder")):
        height = width = int(spec["size"])
    channels = spec.get("channels") or channels
    return None if None in (channels, height, width) else int(channels) * int(height) * int(width)


def in_linf(session: Session, jobs: list[summary.Job]) -> list[summary.Job]:
    """The jobs with every radius (rows, cap, sequential target) divided by sqrt(d): the L∞ radius an L2
    certificate implies (a ball of L∞ radius R / sqrt(d) lies inside the L2 ball of radius R)."""
    found = []
    for job in jobs:
        d = input_dimension(repo.get_job(session, job.job_id).spec or {})
        if d is None:
            raise InvalidArgument(f"job {job.job_id} ({safe(job.label)}): its image size is not known from its spec, "
                                  f"so its L∞ radius R / sqrt(d) cannot be given; drop --linf")
        scale = 1 / math.sqrt(d)
        rows = None if job.rows is None else [replace(row, radius=row.radius * scale) for row in job.rows]
        found.append(job._replace(rows=rows, tally=None, cap=None if job.cap is None else job.cap * scale,
                                  target=None if job.target is None else job.target * scale, dimension=d))
    return found


def linf_note(jobs: list[summary.Job]) -> str:
    """The note of a table in L∞: what its radii are, and each d."""
    sizes = sorted({job.dimension for job in jobs if job.dimension})
    return (f"radii are L∞: the L2 radius R / sqrt(d), d = {', '.join(map(str, sizes))} pixel values "
            f"(a sequential job's target too)")


def partial_note(session: Session, job_id: int, stored: int) -> str | None:
    """A warning line when a job's numbers are not final: it is not done, or it ended before every image."""
    job = repo.get_job(session, job_id)
    if job.status == "succeeded" and stored >= job.progress_total:
        return None
    return (f"partial: {stored} of {job.progress_total} images, job {job.status}"
            + ("" if job.finished else "; the numbers will change"))


def prediction(session: Session, job_id: int) -> tuple[list[dict], bool, str | None] | None:
    """A PREDICT job's per-image answers (``predictions.records``), whether an API gave them, and its partial
    note; None for any other job."""
    job = repo.get_job(session, job_id)
    if not predictions.is_prediction(job.spec):
        return None
    rows = repo.results_for_job(session, job_id)
    if not rows:
        raise JobStateError(f"job {job_id} has no results yet (status {job.status})")
    return predictions.records(rows, job.spec), job.kind == "certify_api", partial_note(session, job_id, len(rows))
