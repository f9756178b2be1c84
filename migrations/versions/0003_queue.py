"""The task queue: priorities, experiments, dependencies between jobs, and queue workers.

Existing jobs keep their rows: they get priority 0 and no experiment, dependency or meta.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ADD COLUMN, never a batch copy of `jobs`: on SQLite a copy drops the old table, and with
    # foreign keys on, that drop would cascade to every result, log and work unit of every job.
    op.add_column("jobs", sa.Column("priority", sa.Integer(), server_default=sa.text("0"), nullable=False))
    op.add_column("jobs", sa.Column("experiment", sa.String(length=200), nullable=True))
    op.add_column("jobs", sa.Column("meta", sa.JSON(), nullable=True))
    op.add_column("jobs", sa.Column("blocked_by", sa.Integer(), nullable=True))  # a job id, no foreign key: dsq delete clears it
    op.create_index(op.f("ix_jobs_experiment"), "jobs", ["experiment"])
    op.create_table(
        "job_dependencies",
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("depends_on", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_job_dependencies_job_id_jobs"),
                                ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["depends_on"], ["jobs.id"], name=op.f("fk_job_dependencies_depends_on_jobs"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", "depends_on", name=op.f("pk_job_dependencies")),
    )
    op.create_index(op.f("ix_job_dependencies_depends_on"), "job_dependencies", ["depends_on"])
    op.create_table(
        "workers",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("host", sa.String(length=200), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("address", sa.String(length=200), nullable=True),
        sa.Column("max_jobs", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workers")),
        sa.UniqueConstraint("name", name=op.f("uq_workers_name")),
    )


def downgrade() -> None:
    op.drop_table("workers")
    op.drop_index(op.f("ix_job_dependencies_depends_on"), table_name="job_dependencies")
    op.drop_table("job_dependencies")
    op.drop_index(op.f("ix_jobs_experiment"), table_name="jobs")
    for column in ("blocked_by", "meta", "experiment", "priority"):
        op.drop_column("jobs", column)  # SQLite >= 3.35 drops columns in place
