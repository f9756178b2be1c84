"""Where a worker runs on its Ray: the node's id and, for a detached worker, its actor's id. Another worker of the
same cluster that sees that node or actor dead (Ray says so) takes its jobs back at once.

Existing workers record them from their next start.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ADD COLUMN (see 0003).
    op.add_column("workers", sa.Column("node_id", sa.String(length=64), nullable=True))
    op.add_column("workers", sa.Column("actor_id", sa.String(length=64), nullable=True))


def downgrade() -> None:
    for column in ("actor_id", "node_id"):
        op.drop_column("workers", column)
