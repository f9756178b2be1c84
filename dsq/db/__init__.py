"""The job database: tables (``models``), engines and sessions (``session``), queries (``repo``).

Importing this package connects to nothing; call ``open_database(url)`` for an
engine whose schema is up to date, and ``session_scope(engine)`` for a transaction.
"""

from dsq.db.models import Artifact, Base, Job, JobLog, Result, WorkUnit
from dsq.db.session import (
    current_revision,
    default_database_url,
    head_revision,
    make_engine,
    mask_url,
    open_database,
    session_scope,
    upgrade,
)

__all__ = [
    "Artifact",
    "Base",
    "Job",
    "JobLog",
    "Result",
    "WorkUnit",
    "current_revision",
    "default_database_url",
    "head_revision",
    "make_engine",
    "mask_url",
    "open_database",
    "session_scope",
    "upgrade",
]
