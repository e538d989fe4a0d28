"""consent feedback: suppression sources and complaint reports

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02 02:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

from kaeru.models import UTCDateTime

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("suppressions", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("source", sqlmodel.sql.sqltypes.AutoString(length=50), nullable=True)
        )
    op.create_table(
        "feedback_reports",
        sa.Column("report_id", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column("kind", sqlmodel.sql.sqltypes.AutoString(length=20), nullable=False),
        sa.Column("message_id", sqlmodel.sql.sqltypes.AutoString(length=400), nullable=True),
        sa.Column("customer_id", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=True),
        sa.Column("received_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("report_id"),
    )


def downgrade() -> None:
    op.drop_table("feedback_reports")
    with op.batch_alter_table("suppressions", schema=None) as batch_op:
        batch_op.drop_column("source")
