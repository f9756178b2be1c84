"""Retries that end: each run of a job (job_attempts), a job's max attempts and backoff, what workers offer.

Existing jobs get max_attempts 3 and no attempt rows (their runs were not recorded); existing workers record
their resources from their next start.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ADD COLUMN (see 0003: a batch copy of `jobs` would cascade deletes on SQLite).
    op.add_column("jobs", sa.Column("max_attempts", sa.Integer(), server_default=sa.text("3"), nullable=False))
    op.add_column("jobs", sa.Column("not_before", sa.DateTime(timezone=True), nullable=True))
    op.add_column("workers", sa.Column("resources", sa.JSON(), nullable=True))
    op.add_column("workers", sa.Column("free", sa.JSON(), nullable=True))
    op.create_table(
        "job_attempts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("worker", sa.String(length=200), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("counts", sa.Boolean(), server_default=sa.true(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_job_attempts_job_id_jobs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_attempts")),
    )
    op.create_index(op.f("ix_job_attempts_job_id_id"), "job_attempts", ["job_id", "id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_job_attempts_job_id_id"), table_name="job_attempts")
    op.drop_table("job_attempts")
    for column in ("free", "resources"):
        op.drop_column("workers", column)
    for column in ("not_before", "max_attempts"):
        op.drop_column("jobs", column)
