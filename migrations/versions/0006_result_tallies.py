"""An index on results that holds every column a results table counts (job, correct, radius, prediction, image):
``repo.result_tallies`` and ``repo.radius_histograms`` read it instead of the rows, whose counts and extra columns
make them large (200,000 results: a scan of the index, not of the table).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ["job_id", "correct", "radius", "prediction", "image_index"]


def upgrade() -> None:
    op.create_index(op.f("ix_results_job_id_correct_radius_prediction_image_index"), "results", COLUMNS)


def downgrade() -> None:
    op.drop_index(op.f("ix_results_job_id_correct_radius_prediction_image_index"), table_name="results")
