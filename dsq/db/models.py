"""Tables of the job system (SQLAlchemy 2 declarative).

``jobs`` holds one row per submitted job, its lifecycle and its place in the queue
(priority, experiment), ``job_dependencies`` the edges a job waits on, ``workers``
the queue workers that claim jobs, ``work_units`` the units a runner works through,
``results`` one certificate per image, ``previews`` a picture of a few of an image's
noisy samples, ``artifacts`` the checkpoints jobs produce, and ``job_logs`` what a job said.

Every timestamp is a timezone-aware UTC ``datetime`` on the Python side, whatever
the database stores (SQLite has no time zones).  Every change to these classes
needs a new revision under ``migrations/versions``; ``tests/test_db.py`` checks
that models and migrations agree.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    false,
    text,
    true,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

JOB_KINDS = ("train", "certify", "certify_api", "preview")
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled", "budget")
# "budget": a certify-api job stopped at its query budget (dsq resume N --max-queries M goes on).
FINISHED_STATUSES = ("succeeded", "failed", "cancelled", "budget")
ENDED_BADLY = ("failed", "cancelled", "budget")  # what no job waiting for it survives
# How a run of a job (a row of job_attempts) ended. "died" (its worker was killed or went stale) and "error" (an
# unexpected exception) count against the job's max_attempts; "handed back" (a clean stop) does not.
ATTEMPT_OUTCOMES = ("running", "succeeded", "error", "died", "handed back", "failed", "cancelled", "budget")
DEFAULT_MAX_ATTEMPTS = 3
WORK_UNIT_STATUSES = ("pending", "running", "done", "failed")
ARTIFACT_KINDS = ("denoiser", "classifier")
LOG_LEVELS = ("debug", "info", "warning", "error")

# Deterministic constraint names, so migrations can refer to them (SQLite batch mode needs names).
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """A ``DateTime(timezone=True)`` that always hands back aware UTC datetimes.

    Naive datetimes are refused on the way in: they are ambiguous, and SQLite
    would silently drop any offset.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: pass a timezone-aware one")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _job_fk(ondelete: str = "CASCADE") -> ForeignKey:
    return ForeignKey("jobs.id", ondelete=ondelete)


class Job(Base):
    """A submitted job: its validated spec, where it stands, and who drives it."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(32))
    name: Mapped[str | None] = mapped_column(String(200))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    seed: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), index=True, default="queued")
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    progress_done: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    progress_total: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    error: Mapped[str | None] = mapped_column(Text)
    traceback: Mapped[str | None] = mapped_column(Text)
    runner: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    experiment: Mapped[str | None] = mapped_column(String(200), index=True)
    # What an experiment says of the job (method label, sigma, step name); None outside experiments.
    meta: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # The dependency whose failure or cancellation failed this job; resuming it re-queues this one.
    blocked_by: Mapped[int | None] = mapped_column(Integer)  # a job id (dsq delete clears it)
    # Runs that may end in an unexpected error or a dead worker before the job ends failed; and the time before
    # which a job retried after an error is not claimed (its backoff).
    max_attempts: Mapped[int] = mapped_column(Integer, default=DEFAULT_MAX_ATTEMPTS,
                                              server_default=text(str(DEFAULT_MAX_ATTEMPTS)))
    not_before: Mapped[datetime | None] = mapped_column(UTCDateTime)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_STATUSES

    def __repr__(self) -> str:
        return f"Job(id={self.id}, kind={self.kind!r}, status={self.status!r})"


class JobDependency(Base):
    """Job ``job_id`` runs only once job ``depends_on`` has succeeded."""

    __tablename__ = "job_dependencies"

    job_id: Mapped[int] = mapped_column(Integer, _job_fk(), primary_key=True)
    depends_on: Mapped[int] = mapped_column(Integer, _job_fk(), primary_key=True, index=True)


class Worker(Base):
    """A queue worker: where it runs and when it was last alive."""

    __tablename__ = "workers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    host: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    address: Mapped[str | None] = mapped_column(String(200))  # the Ray cluster it drives (None: a local Ray)
    max_jobs: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # What the worker's Ray offers ({"CPU": 8, "GPU": 1}) and what its jobs leave free, as of its last heartbeat:
    # what `dsq jobs` says a waiting job waits for, without asking Ray.
    resources: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    free: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # The Ray node it runs on and, for a detached worker, its actor (hex ids; None: not recorded): when Ray reports
    # either dead, the other workers of that cluster take its jobs back at once.
    node_id: Mapped[str | None] = mapped_column(String(64))
    actor_id: Mapped[str | None] = mapped_column(String(64))

    def __repr__(self) -> str:
        return f"Worker(name={self.name!r}, stopped_at={self.stopped_at!r})"


class JobAttempt(Base):
    """One run of a job: who ran it, how it ended and why (``dsq show``, ``dsq logs``)."""

    __tablename__ = "job_attempts"
    __table_args__ = (Index(None, "job_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(Integer, _job_fk())
    number: Mapped[int] = mapped_column(Integer)  # the attempt it counts as (a handed-back run is run again as it)
    worker: Mapped[str] = mapped_column(String(200))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    outcome: Mapped[str] = mapped_column(String(16), default="running")
    error: Mapped[str | None] = mapped_column(Text)
    # Whether it counts against max_attempts now: a resume gives the job its attempts afresh (False for the old).
    counts: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())

    def __repr__(self) -> str:
        return f"JobAttempt(job_id={self.job_id}, number={self.number}, outcome={self.outcome!r})"


class WorkUnit(Base):
    """One unit of a job's work (an image, or a shard of its samples): the task queue."""

    __tablename__ = "work_units"
    __table_args__ = (
        UniqueConstraint("job_id", "key"),
        Index(None, "job_id", "status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(Integer, _job_fk())
    key: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    worker: Mapped[str | None] = mapped_column(String(200))
    error: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    def __repr__(self) -> str:
        return f"WorkUnit(job_id={self.job_id}, key={self.key!r}, status={self.status!r})"


class Result(Base):
    """One image's certificate: counts, lower bound, radius and where it was computed."""

    __tablename__ = "results"
    # the second index holds every column a results table counts (repo.result_tallies): it is read without the rows
    __table_args__ = (UniqueConstraint("job_id", "image_index"),
                      Index(None, "job_id", "correct", "radius", "prediction", "image_index"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(Integer, _job_fk())
    image_index: Mapped[int] = mapped_column(Integer)
    label: Mapped[int | None] = mapped_column(Integer)
    prediction: Mapped[int] = mapped_column(Integer)  # -1 = abstain
    radius: Mapped[float] = mapped_column(Double)
    correct: Mapped[bool] = mapped_column(Boolean)
    p_lower: Mapped[float] = mapped_column(Double)
    counts_selection: Mapped[list[int]] = mapped_column(JSON)
    counts_estimation: Mapped[list[int]] = mapped_column(JSON)
    n0: Mapped[int] = mapped_column(Integer)
    n: Mapped[int] = mapped_column(Integer)
    alpha: Mapped[float] = mapped_column(Double)
    sigma: Mapped[float] = mapped_column(Double)
    seconds: Mapped[float] = mapped_column(Double)
    worker: Mapped[str | None] = mapped_column(String(200))
    device: Mapped[str | None] = mapped_column(String(100))
    extra: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    def __repr__(self) -> str:
        return (
            f"Result(job_id={self.job_id}, image_index={self.image_index}, "
            f"prediction={self.prediction}, radius={self.radius!r})"
        )


class Artifact(Base):
    """A file a job produced (a trained denoiser...), with its checksum and metrics."""

    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int | None] = mapped_column(Integer, _job_fk("SET NULL"))
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(32))
    location: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    def __repr__(self) -> str:
        return f"Artifact(id={self.id}, job_id={self.job_id}, name={self.name!r})"


class JobLog(Base):
    """One line a job logged."""

    __tablename__ = "job_logs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(Integer, _job_fk(), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    level: Mapped[str] = mapped_column(String(16), default="info")
    message: Mapped[str] = mapped_column(Text)

    def __repr__(self) -> str:
        return f"JobLog(job_id={self.job_id}, level={self.level!r}, message={self.message!r})"


class ApiAnswer(Base):
    """A vision API's raw answer to one encoded image, paid once: keyed by (provider, service, sha256).

    ``service`` tells answers of the vendor (``vendor``) from an emulator's (``embedded`` or its
    address), so an emulator's labels are never re-used as a vendor's. ``job_id`` is the job that
    paid for the query (budgets count these rows).
    """

    __tablename__ = "api_answers"
    __table_args__ = (UniqueConstraint("provider", "service", "sha256"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    provider: Mapped[str] = mapped_column(String(32))
    service: Mapped[str] = mapped_column(String(200))
    sha256: Mapped[str] = mapped_column(String(64))
    answer: Mapped[dict[str, Any]] = mapped_column(JSON)
    top_label: Mapped[str] = mapped_column(Text)
    job_id: Mapped[int | None] = mapped_column(Integer, _job_fk("SET NULL"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    def __repr__(self) -> str:
        return f"ApiAnswer(provider={self.provider!r}, sha256={self.sha256[:12]!r}, top_label={self.top_label!r})"


class Preview(Base):
    """A few noisy samples of one image of a certify job beside their denoised versions, as one small PNG
    (``dsq.previews``), and the class f gave each. Drawn from a noise stream of its own: never part of a
    certificate. Made by the certify job for its first images, or by a ``preview`` job on request."""

    __tablename__ = "previews"
    __table_args__ = (UniqueConstraint("job_id", "image_index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(Integer, _job_fk())
    image_index: Mapped[int] = mapped_column(Integer)
    samples: Mapped[int] = mapped_column(Integer)
    png: Mapped[bytes] = mapped_column(LargeBinary)
    classes: Mapped[list[int]] = mapped_column(JSON)  # f's class on each denoised sample (-1: not finite)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    def __repr__(self) -> str:
        return f"Preview(job_id={self.job_id}, image_index={self.image_index}, samples={self.samples})"
