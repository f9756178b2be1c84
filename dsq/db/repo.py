"""Every read and write of the job tables.

Each function takes a ``Session`` first and never commits: the caller owns the
transaction (see ``dsq.db.session.session_scope``).  Ray may run a task twice,
so writes of results, work units and artifacts are upserts keyed by identity
(``INSERT ... ON CONFLICT DO UPDATE`` on SQLite and PostgreSQL): the second
write leaves one row holding the latest values.  Job state changes are single
``UPDATE ... RETURNING`` statements, so concurrent writers never lose each
other's columns.  Functions that stamp a time take ``now`` (default: the clock).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, NamedTuple, TypeVar

from sqlalchemy import (BigInteger, Integer, Select, and_, case, cast, delete, false, func, literal, or_, select,
                        union_all, update)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from dsq.db.models import (
    ARTIFACT_KINDS,
    DEFAULT_MAX_ATTEMPTS,
    FINISHED_STATUSES,
    JOB_KINDS,
    LOG_LEVELS,
    WORK_UNIT_STATUSES,
    Artifact,
    Base,
    Job,
    JobAttempt,
    JobDependency,
    JobLog,
    Preview,
    Result,
    Worker,
    WorkUnit,
    utcnow,
)
from dsq.errors import InvalidArgument, JobNotFound, JobStateError, UnknownName
from dsq.report.accuracy import FIXED_POINT, Tally

M = TypeVar("M", bound=Base)

_RESULT_FIELDS = frozenset(Result.__table__.columns.keys()) - {"id", "job_id", "image_index", "created_at"}
_RESULT_REQUIRED = frozenset(name for name in _RESULT_FIELDS if not Result.__table__.columns[name].nullable)
_REFRESH = {"populate_existing": True}


# -- helpers ---------------------------------------------------------------------------


def _check_choice(what: str, value: str, choices: Iterable[str]) -> None:
    if value not in choices:
        raise InvalidArgument(f"unknown {what} {value!r}: expected one of {', '.join(choices)}")


def _plain(value: Any) -> Any:
    """``value`` with numpy/torch scalars and arrays turned into Python ints, floats and lists."""
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return _plain(value.tolist())
    return value


def _insert(s: Session, model):
    """The INSERT of this session's dialect, which knows ON CONFLICT (SQLite and PostgreSQL)."""
    dialect = s.get_bind().dialect.name
    insert = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}.get(dialect)
    if insert is None:
        raise NotImplementedError(f"upserts are not implemented for {dialect}")
    return insert(model)


def image_unit(index: int) -> str:
    """The key of image ``index``'s work unit in the tasks table."""
    return f"image:{index}"


def _upsert(s: Session, model: type[M], identity: dict[str, Any], insert: dict, update_: dict) -> M:
    """Insert a row of ``model`` keyed by ``identity``, or update the existing one; return it."""
    stmt = _insert(s, model).values(**identity, **insert)
    stmt = stmt.on_conflict_do_update(index_elements=list(identity), set_=update_)
    return s.scalars(stmt.returning(model), execution_options=_REFRESH).one()


MAX_ID = 2**63 - 1  # ids are 64-bit signed integers on both databases: a larger number names no job


def _known_id(job_id: int) -> int:
    """``job_id`` if it can name a job at all; JobNotFound for a number no id column holds (SQLite would
    otherwise raise OverflowError binding it)."""
    if not 0 < job_id <= MAX_ID:
        raise JobNotFound(f"no job with id {job_id}")
    return job_id


def _update_job(s: Session, job_id: int, *conditions: Any, **values: Any) -> Job | None:
    """UPDATE one job (if ``conditions`` hold) and return it fresh, or None if nothing matched."""
    _known_id(job_id)
    stmt = update(Job).where(Job.id == job_id, *conditions).values(**values).returning(Job)
    return s.scalars(stmt, execution_options=_REFRESH).one_or_none()


def _job_status(s: Session, job_id: int) -> str:
    status = s.scalar(select(Job.status).where(Job.id == _known_id(job_id)))
    if status is None:
        raise JobNotFound(f"no job with id {job_id}")
    return status


def _require_job(job: Job | None, job_id: int) -> Job:
    if job is None:
        raise JobNotFound(f"no job with id {job_id}")
    return job


# -- jobs ------------------------------------------------------------------------------


def create_job(
    s: Session, *, kind: str, spec: dict[str, Any], seed: int, name: str | None = None, total: int = 0,
    priority: int = 0, experiment: str | None = None, meta: dict[str, Any] | None = None,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> Job:
    """Add a queued job and return it (its ``id`` is set)."""
    _check_choice("job kind", kind, JOB_KINDS)
    job = Job(
        kind=kind, name=name, spec=_plain(spec), seed=int(seed), status="queued", cancel_requested=False,
        progress_done=0, progress_total=int(total), attempts=0, created_at=utcnow(), priority=int(priority),
        experiment=experiment, meta=_plain(meta) if meta is not None else None, max_attempts=int(max_attempts),
    )
    s.add(job)
    s.flush()
    return job


def get_job(s: Session, job_id: int) -> Job:
    """The job with this id; raises ``JobNotFound``."""
    return _require_job(s.get(Job, _known_id(job_id)), job_id)


def list_jobs(s: Session, limit: int = 50, status: str | None = None, kind: str | None = None,
              experiment: str | None = None) -> list[Job]:
    """The newest jobs first, optionally only those in one status, of one kind or of one experiment."""
    stmt: Select = select(Job).order_by(Job.id.desc()).limit(limit)
    for column, value in ((Job.status, status), (Job.kind, kind), (Job.experiment, experiment)):
        if value is not None:
            stmt = stmt.where(column == value)
    return list(s.scalars(stmt))


def delete_jobs(s: Session, job_ids: Iterable[int], *, artifacts: bool = False) -> list[Artifact]:
    """Delete jobs with their results, work units, logs and dependency edges; return the artifact rows they had.

    Their artifacts stay as rows of no job unless ``artifacts`` (then the rows go; the files are the caller's),
    the API answers they paid for stay in the cache, and a job they failed forgets them (``blocked_by``).
    """
    from dsq.db.models import ApiAnswer

    ids = sorted(set(job_ids))
    owned = Artifact.job_id.in_(ids)
    had = list(s.scalars(select(Artifact).where(owned)))
    s.execute(delete(Artifact).where(owned) if artifacts else update(Artifact).where(owned).values(job_id=None))
    s.execute(update(ApiAnswer).where(ApiAnswer.job_id.in_(ids)).values(job_id=None))
    s.execute(update(Job).where(Job.blocked_by.in_(ids)).values(blocked_by=None))
    s.execute(delete(JobDependency).where(or_(JobDependency.job_id.in_(ids), JobDependency.depends_on.in_(ids))))
    for model in (Result, Preview, WorkUnit, JobLog, JobAttempt):
        s.execute(delete(model).where(model.job_id.in_(ids)))
    s.execute(delete(Job).where(Job.id.in_(ids)))
    return had


def artifact_in_use(s: Session, sha256: str) -> bool:
    """Whether an artifact row still names these bytes (a content-addressed file may serve several)."""
    return s.scalar(select(func.count()).select_from(Artifact).where(Artifact.sha256 == sha256)) > 0


def mark_running(s: Session, job_id: int, runner: str, *, now: datetime | None = None) -> Job:
    """A runner starts (or restarts) the job: one more attempt, fresh start and heartbeat."""
    now = now or utcnow()
    job = _update_job(
        s, job_id, status="running", runner=runner, attempts=Job.attempts + 1, started_at=now,
        heartbeat_at=now, finished_at=None, error=None, traceback=None,
    )
    return _require_job(job, job_id)


def mark_finished(
    s: Session, job_id: int, status: str, error: str | None = None, traceback: str | None = None,
    *, now: datetime | None = None,
) -> Job:
    """The job ended as ``succeeded``, ``failed`` or ``cancelled``."""
    _check_choice("final job status", status, FINISHED_STATUSES)
    now = now or utcnow()
    job = _update_job(
        s, job_id, status=status, error=error, traceback=traceback, finished_at=now, heartbeat_at=now
    )
    return _require_job(job, job_id)


def mark_queued(s: Session, job_id: int) -> Job:
    """Put a job back in the queue (resume/retry): clears the cancel request and the last error."""
    job = _update_job(
        s, job_id, status="queued", cancel_requested=False, runner=None, error=None, traceback=None,
        finished_at=None, not_before=None,
    )
    return _require_job(job, job_id)


def set_spec(s: Session, job_id: int, spec: dict[str, Any]) -> Job:
    """Replace a job's spec (choices left to the runner, such as an automatic batch size; a raised query budget)."""
    return _require_job(_update_job(s, job_id, spec=_plain(spec)), job_id)


def set_progress(s: Session, job_id: int, done: int, total: int | None = None) -> Job:
    values = {"progress_done": int(done)}
    if total is not None:
        values["progress_total"] = int(total)
    return _require_job(_update_job(s, job_id, **values), job_id)


def heartbeat(s: Session, job_id: int, *, now: datetime | None = None) -> Job:
    return _require_job(_update_job(s, job_id, heartbeat_at=now or utcnow()), job_id)


def request_cancel(s: Session, job_id: int) -> Job:
    """Ask the job to stop; raises ``JobStateError`` if it already finished."""
    job = _update_job(s, job_id, Job.status.not_in(FINISHED_STATUSES), cancel_requested=True)
    if job is None:
        status = _job_status(s, job_id)
        raise JobStateError(f"job {job_id} is already {status}: nothing to cancel")
    return job


def is_cancel_requested(s: Session, job_id: int) -> bool:
    """Read fresh from the database (not from objects the session already holds)."""
    requested = s.scalar(select(Job.cancel_requested).where(Job.id == job_id))
    if requested is None:
        raise JobNotFound(f"no job with id {job_id}")
    return bool(requested)


# -- results ---------------------------------------------------------------------------


def upsert_result(s: Session, job_id: int, image_index: int, **fields: Any) -> Result:
    """Store one image's certificate; storing it again replaces it with the new values.

    ``fields`` are ``Result`` columns: prediction, radius, correct, p_lower,
    counts_selection, counts_estimation, n0, n, alpha, sigma, seconds (required) and
    label, worker, device, extra (optional).  numpy values are accepted.
    """
    unknown, missing = set(fields) - _RESULT_FIELDS, _RESULT_REQUIRED - set(fields)
    if unknown or missing:
        raise TypeError(f"upsert_result(): unknown fields {sorted(unknown)}, missing fields {sorted(missing)}")
    values = {name: _plain(value) for name, value in fields.items()}
    identity = {"job_id": job_id, "image_index": int(image_index)}
    return _upsert(s, Result, identity, {**values, "created_at": utcnow()}, values)


def results_for_job(s: Session, job_id: int) -> list[Result]:
    return list(s.scalars(select(Result).where(Result.job_id == job_id).order_by(Result.image_index)))


def result_fields(s: Session, job_id: int) -> list:
    """A job's results, only the columns a certified-accuracy table reads (``dsq.report.accuracy.RESULT_FIELDS``),
    by image: loading every column of 10,000 rows as objects costs ten times more."""
    columns = (Result.image_index, Result.label, Result.prediction, Result.radius, Result.correct, Result.seconds)
    return list(s.execute(select(*columns).where(Result.job_id == job_id).order_by(Result.image_index)))


def with_results(s: Session, job_ids: Iterable[int]) -> set[int]:
    """Which of the jobs have at least one result (an index probe each, nothing counted)."""
    stored = select(Result.id).where(Result.job_id == Job.id).exists()
    return set(s.scalars(select(Job.id).where(Job.id.in_(list(job_ids)), stored)))


def _counted_radius(scale: float | None):
    """A result's radius as a table counts it: as stored (L2), or times ``scale`` (1 / sqrt(d): L∞)."""
    return Result.radius if scale is None else Result.radius * float(scale)


_CORRECT = and_(Result.correct, Result.prediction != -1)  # as dsq.report.accuracy.as_result says it


def result_tallies(s: Session, job_ids: Iterable[int], radii: Iterable[float], scale: float | None = None,
                   per_unit: float | None = None, largest: Mapping[int, float] | None = None) -> dict[int, Tally]:
    """Each job's ``accuracy.Tally`` at ``radii``, counted by the database over the ``results`` index (no row is
    loaded): the integers ``accuracy.tally`` counts from the rows, and the same radius sum (``accuracy.radius_sum``:
    whole steps of 1 / FIXED_POINT, added as integers).
    ``scale``: radii times it (L∞), as ``views.in_linf`` turns rows. A job without results is not in the answer.

    Its ``steps`` count the correct images by ``floor(radius * per_unit)`` (default: ``STEPS`` steps up to the
    largest radius). The count at a radius r is then exact without comparing every row with r: the steps above
    r's, plus the rows of r's own step (a short range of the index) at r or more. ``largest``: what
    ``largest_radii`` says of these jobs, when already asked.
    """
    ids, radii = list(job_ids), tuple(float(r) for r in radii)
    radius = _counted_radius(scale)
    largest = {job_id: top for job_id, top in (largest or {}).items() if job_id in ids}
    largest.update(largest_radii(s, [job_id for job_id in ids if job_id not in largest], scale))
    top = max([r for r in largest.values() if r < math.inf], default=0.0)
    per_unit = float(per_unit or (STEPS / top if top > 0 else 1.0))
    size = min(math.floor(top * per_unit), STEPS * 4) + 2  # the last step holds anything above (inf)
    finite = and_(_CORRECT, radius < math.inf)  # the radius sum in whole steps of 1 / FIXED_POINT
    stmt = (select(Result.job_id, func.count(), func.count().filter(Result.prediction == -1),
                   func.sum(_whole(s, radius * FIXED_POINT, BigInteger)).filter(finite),
                   func.count().filter(_CORRECT, radius == math.inf), func.min(Result.image_index),
                   func.max(Result.image_index))
            .where(Result.job_id.in_(ids)).group_by(Result.job_id))
    totals = {job_id: (n, abstains, int(total or 0), infinite, first, last)
              for job_id, n, abstains, total, infinite, first, last in s.execute(stmt)}
    step = _step_of(s, radius * per_unit, size - 1)
    bucket = step.label("step")
    steps = {job_id: [0] * size for job_id in totals}
    # a job at a time (SQLite sorts each job's steps apart, cheaper than all at once), in one statement
    for job_id, index, count in _each(s, [select(literal(job_id), bucket, func.count())
                                          .where(Result.job_id == job_id, _CORRECT).group_by(bucket)
                                          for job_id in totals]):
        steps[job_id][index] += count
    owns = [math.floor(r * per_unit) if r * per_unit < size - 1 else size - 1 for r in radii]
    parts = []
    for k, (r, own) in enumerate(zip(radii, owns)):
        edges = [(own - 1) / per_unit, (own + 2) / per_unit if own < size - 1 else math.inf]
        low, high = edges if scale is None else [edge / scale for edge in edges]
        parts.append(select(literal(k), Result.job_id, func.count())
                     .where(Result.job_id.in_(list(totals)), _CORRECT, Result.radius >= low, Result.radius <= high,
                            step == own, radius >= r).group_by(Result.job_id))
    within = {(k, job_id): count for k, job_id, count in _each(s, parts)}
    certified = {job_id: [sum(steps[job_id][own + 1:]) + within.get((k, job_id), 0) for k, own in enumerate(owns)]
                 for job_id in totals}
    return {job_id: Tally(n, sum(steps[job_id]), abstains, math.inf if infinite else total / FIXED_POINT,
                          largest[job_id], first, last, radii, tuple(certified[job_id]), tuple(steps[job_id]))
            for job_id, (n, abstains, total, infinite, first, last) in totals.items()}


STEPS = 256  # a tally's default grid: this many steps up to the largest radius


def _whole(s: Session, scaled, kind=Integer):
    """``floor(scaled)`` as an integer (radii are >= 0: SQLite's CAST truncates, which is floor there;
    PostgreSQL's rounds, so floor() first)."""
    return cast(func.floor(scaled) if s.get_bind().dialect.name == "postgresql" else scaled, kind)


def _step_of(s: Session, scaled, last: int):
    """``floor(scaled)`` as an integer, at most ``last`` (an infinite radius is the last step)."""
    return case((scaled >= last, last), else_=_whole(s, scaled))


def largest_radii(s: Session, job_ids: Iterable[int], scale: float | None = None) -> dict[int, float]:
    """Each job's largest radius of a correct image (0 when none; times ``scale``), from the end of the index: no
    scan; one statement per ``_BATCH`` jobs."""
    ids, found = list(job_ids), {}
    for start in range(0, len(ids), _BATCH):
        batch = ids[start:start + _BATCH]
        tops = s.execute(select(*(select(Result.radius).where(Result.job_id == job_id, _CORRECT)
                                  .order_by(Result.radius.desc()).limit(1).scalar_subquery()
                                  for job_id in batch))).one()
        found.update({job_id: 0.0 if top is None else top if scale is None else top * float(scale)
                      for job_id, top in zip(batch, tops)})
    return found


_BATCH = 50  # queries per statement: a round trip each costs more than the query on a small range


def _each(s: Session, parts: list) -> list:
    """The rows of every query in ``parts``, ``_BATCH`` of them joined (UNION ALL) per statement."""
    found = []
    for start in range(0, len(parts), _BATCH):
        batch = parts[start:start + _BATCH]
        found += s.execute(batch[0] if len(batch) == 1 else union_all(*batch)).all()
    return found


def results_version(s: Session, job_ids: Iterable[int]) -> tuple:
    """What changes whenever a result of these jobs is written or their state changes, in two small queries:
    per job its status and progress, and the count and newest id of their results (an upsert that rewrites a
    row keeps its id, so the jobs' progress and status stand beside it)."""
    ids = list(job_ids)
    states = tuple(s.execute(select(Job.id, Job.status, Job.progress_done, Job.finished_at)
                             .where(Job.id.in_(ids)).order_by(Job.id)))
    counted = s.execute(select(func.count(), func.max(Result.id)).where(Result.job_id.in_(ids))).one()
    return tuple(map(tuple, states)), tuple(counted)


def experiment_job_ids(s: Session, experiment: str) -> list[int]:
    return list(s.scalars(select(Job.id).where(Job.experiment == experiment).order_by(Job.id)))


def result_for_image(s: Session, job_id: int, image_index: int) -> Result | None:
    """One image's result, None when the job stored none for it."""
    return s.scalars(select(Result).where(Result.job_id == job_id, Result.image_index == image_index)).first()


def upsert_preview(s: Session, job_id: int, image_index: int, *, png: bytes, classes: list[int]) -> Preview:
    """Store an image's preview (``dsq.previews``); storing it again replaces it."""
    values = {"png": bytes(png), "classes": _plain(classes), "samples": len(classes)}
    return _upsert(s, Preview, {"job_id": job_id, "image_index": int(image_index)},
                   {**values, "created_at": utcnow()}, values)


def preview_for_image(s: Session, job_id: int, image_index: int) -> Preview | None:
    return s.scalars(select(Preview).where(Preview.job_id == job_id, Preview.image_index == image_index)).first()


def previewed_indices(s: Session, job_id: int) -> set[int]:
    return set(s.scalars(select(Preview.image_index).where(Preview.job_id == job_id)))


def abstained_indices(s: Session, job_id: int, limit: int) -> list[int]:
    """The first ``limit`` images a job abstained on, by index."""
    stmt = select(Result.image_index).where(Result.job_id == job_id, Result.prediction == -1)
    return list(s.scalars(stmt.order_by(Result.image_index).limit(limit)))


def done_image_indices(s: Session, job_id: int) -> set[int]:
    return set(s.scalars(select(Result.image_index).where(Result.job_id == job_id)))


class ResultCounts(NamedTuple):
    stored: int  # results of the job
    certified: int  # of them, correct and certified at the radius asked
    since: int  # of them, first stored at or after the time asked


def count_results(s: Session, job_id: int, *, radius: float = 0.0, since: datetime | None = None) -> ResultCounts:
    """A job's results counted in one query, without loading them (to follow a job every second).

    Certified: correct, not abstaining and radius > 0 and >= ``radius`` (a sequential job's target).
    ``since`` None counts none as recent.
    """
    certified = and_(Result.correct, Result.prediction != -1, Result.radius > 0, Result.radius >= float(radius))
    recent = Result.created_at >= since if since is not None else false()
    stmt = select(func.count(), func.sum(case((certified, 1), else_=0)), func.sum(case((recent, 1), else_=0)))
    stored, certified_, recent_ = s.execute(stmt.where(Result.job_id == job_id)).one()
    return ResultCounts(int(stored), int(certified_ or 0), int(recent_ or 0))


# -- work units ------------------------------------------------------------------------


def upsert_work_unit(
    s: Session, job_id: int, key: str, *, status: str, worker: str | None = None,
    error: str | None = None, now: datetime | None = None,
) -> WorkUnit:
    """Record a unit's state; each upsert with ``status="running"`` counts one more attempt."""
    _check_choice("work unit status", status, WORK_UNIT_STATUSES)
    started = 1 if status == "running" else 0
    values = {"status": status, "worker": worker, "error": error, "updated_at": now or utcnow()}
    update_ = {**values, "attempts": WorkUnit.attempts + started}
    return _upsert(s, WorkUnit, {"job_id": job_id, "key": key}, {**values, "attempts": started}, update_)


def work_units(s: Session, job_id: int, status: str | None = None) -> list[WorkUnit]:
    stmt = select(WorkUnit).where(WorkUnit.job_id == job_id).order_by(WorkUnit.id)
    if status is not None:
        stmt = stmt.where(WorkUnit.status == status)
    return list(s.scalars(stmt))


# -- artifacts -------------------------------------------------------------------------


def upsert_artifact(
    s: Session, *, job_id: int | None, name: str, kind: str, location: str, sha256: str,
    spec: dict[str, Any], metrics: dict[str, Any],
) -> Artifact:
    """Record a file a job produced, keyed by (job_id, name); ``job_id=None`` for imported ones."""
    _check_choice("artifact kind", kind, ARTIFACT_KINDS)
    values = {
        "kind": kind, "location": str(location), "sha256": sha256, "spec": _plain(spec),
        "metrics": _plain(metrics),
    }
    if job_id is None:  # NULLs never conflict in a unique constraint: look the row up instead
        return _upsert_unowned_artifact(s, name, values)
    return _upsert(s, Artifact, {"job_id": job_id, "name": name}, {**values, "created_at": utcnow()}, values)


def _upsert_unowned_artifact(s: Session, name: str, values: dict[str, Any]) -> Artifact:
    stmt = select(Artifact).where(Artifact.job_id.is_(None), Artifact.name == name).with_for_update()
    artifact = s.scalars(stmt).first()
    if artifact is None:
        artifact = Artifact(job_id=None, name=name, created_at=utcnow(), **values)
        s.add(artifact)
    else:
        for column, value in values.items():
            setattr(artifact, column, value)
    s.flush()
    return artifact


def get_artifact(s: Session, artifact_id: int) -> Artifact:
    """The artifact with this id; raises ``UnknownName``."""
    artifact = s.get(Artifact, artifact_id)
    if artifact is None:
        raise UnknownName(f"no artifact with id {artifact_id}")
    return artifact


def artifacts_for_job(s: Session, job_id: int) -> list[Artifact]:
    return list(s.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.id)))


# -- logs ------------------------------------------------------------------------------


def add_log(s: Session, job_id: int, message: str, level: str = "info", *, now: datetime | None = None) -> JobLog:
    _check_choice("log level", level, LOG_LEVELS)
    log = JobLog(job_id=job_id, message=message, level=level, created_at=now or utcnow())
    s.add(log)
    s.flush()
    return log


def log_tail(s: Session, job_id: int, limit: int) -> list[JobLog]:
    """A job's last ``limit`` log lines, oldest first."""
    stmt = select(JobLog).where(JobLog.job_id == job_id).order_by(JobLog.id.desc()).limit(limit)
    return list(reversed(list(s.scalars(stmt))))


def queue_progress(s: Session, limit: int) -> list[tuple[int, str, int, int]]:
    """(id, status, done, total) of the newest ``limit`` jobs, in one query: what a live view polls."""
    stmt = select(Job.id, Job.status, Job.progress_done, Job.progress_total).order_by(Job.id.desc()).limit(limit)
    return [tuple(row) for row in s.execute(stmt)]


def experiment_states(s: Session) -> dict[str, dict[str, int]]:
    """Per experiment, how many of its jobs are in each status."""
    stmt = select(Job.experiment, Job.status, func.count()).where(Job.experiment.is_not(None))
    found: dict[str, dict[str, int]] = {}
    for name, status, count in s.execute(stmt.group_by(Job.experiment, Job.status).order_by(Job.experiment)):
        found.setdefault(name, {})[status] = int(count)
    return found


def recent_workers(s: Session, limit: int) -> list[Worker]:
    """The newest ``limit`` workers, stopped ones included."""
    return list(s.scalars(select(Worker).order_by(Worker.id.desc()).limit(limit)))


def logs_for_job(s: Session, job_id: int, after_id: int = 0) -> list[JobLog]:
    """The job's log lines in order; ``after_id`` skips those already shown (to follow a log)."""
    stmt = select(JobLog).where(JobLog.job_id == job_id, JobLog.id > after_id).order_by(JobLog.id)
    return list(s.scalars(stmt))


# -- vision-API answers ----------------------------------------------------------------

from sqlalchemy import func as _func  # noqa: E402

from dsq.db.models import ApiAnswer  # noqa: E402

_IN_CHUNK = 500  # digests per IN (...) query: well under SQLite's 999 bound parameters of older builds


def api_answers(s: Session, provider: str, service: str, digests: Iterable[str]) -> dict[str, ApiAnswer]:
    """The stored answers among ``digests`` (sha256 of the encoded images), by digest."""
    wanted, found = sorted(set(digests)), {}
    for start in range(0, len(wanted), _IN_CHUNK):
        stmt = select(ApiAnswer).where(ApiAnswer.provider == provider, ApiAnswer.service == service,
                                       ApiAnswer.sha256.in_(wanted[start:start + _IN_CHUNK]))
        found.update((row.sha256, row) for row in s.scalars(stmt))
    return found


def store_api_answer(
    s: Session, *, provider: str, service: str, sha256: str, answer: dict[str, Any], top_label: str,
    job_id: int | None,
) -> bool:
    """Keep the first answer paid for an image (later ones are dropped); True if this one was stored."""
    stmt = _insert(s, ApiAnswer).values(provider=provider, service=service, sha256=sha256, answer=_plain(answer),
                                    top_label=top_label, job_id=job_id, created_at=utcnow())
    stmt = stmt.on_conflict_do_nothing(index_elements=["provider", "service", "sha256"]).returning(ApiAnswer.id)
    return s.execute(stmt).first() is not None


def count_paid_api_answers(s: Session, job_id: int) -> int:
    """How many queries this job paid for (answers it stored first)."""
    return int(s.scalar(select(_func.count()).select_from(ApiAnswer).where(ApiAnswer.job_id == job_id)))
