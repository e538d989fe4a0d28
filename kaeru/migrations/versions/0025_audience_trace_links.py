"""traces: the W3C traceparent of the journey step that queued an audience change

Revision ID: 0025
Revises: 0024
Create Date: 2026-12-02 15:25:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision: str = "0025"
down_revision: str | None = "0024"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("audience_changes") as batch:
        batch.add_column(
            sa.Column("traceparent", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("audience_changes") as batch:
        batch.drop_column("traceparent")
