"""touchpoint analytics: journey kind, variant and channel of every touch

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-02 05:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("touchpoints", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("journey_kind", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=True)
        )
        batch_op.add_column(
            sa.Column("variant", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=True)
        )
        batch_op.add_column(
            sa.Column("channel", sqlmodel.sql.sqltypes.AutoString(length=50), nullable=True)
        )
        batch_op.create_index("ix_touchpoints_journey_kind", ["journey_kind"], unique=False)
        batch_op.create_index("ix_touchpoints_occurred_at", ["occurred_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("touchpoints", schema=None) as batch_op:
        batch_op.drop_index("ix_touchpoints_occurred_at")
        batch_op.drop_index("ix_touchpoints_journey_kind")
        batch_op.drop_column("channel")
        batch_op.drop_column("variant")
        batch_op.drop_column("journey_kind")
