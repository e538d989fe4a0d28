"""journey exactness

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 20:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

import kaeru.models

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # One conversion per journey kind, customer and order (stream B, issue 13 item 5).
    with op.batch_alter_table("touchpoints", schema=None) as batch_op:
        batch_op.add_column(sa.Column("order_key", sa.String(length=1000), nullable=True))
        batch_op.create_unique_constraint("uq_touchpoints_order_key", ["order_key"])
    # What each journey step added to an audience, and parked removals (item 8).
    op.create_table(
        "audience_joins",
        sa.Column("key", sqlmodel.sql.sqltypes.AutoString(length=400), nullable=False),
        sa.Column("journey_id", sqlmodel.sql.sqltypes.AutoString(length=400), nullable=False),
        sa.Column("customer_id", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column("audience", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column("provider", sqlmodel.sql.sqltypes.AutoString(length=20), nullable=False),
        sa.Column("audience_id", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column("email_sha256", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("joined_at", kaeru.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("left_at", kaeru.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("removal_error", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("removal_attempts", sa.Integer(), nullable=False),
        sa.Column("retry_at", kaeru.models.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("key"),
    )
    with op.batch_alter_table("audience_joins", schema=None) as batch_op:
        batch_op.create_index("ix_audience_joins_journey_id", ["journey_id"], unique=False)
        batch_op.create_index("ix_audience_joins_customer_id", ["customer_id"], unique=False)
        batch_op.create_index("ix_audience_joins_retry_at", ["retry_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("audience_joins", schema=None) as batch_op:
        batch_op.drop_index("ix_audience_joins_retry_at")
        batch_op.drop_index("ix_audience_joins_customer_id")
        batch_op.drop_index("ix_audience_joins_journey_id")
    op.drop_table("audience_joins")
    with op.batch_alter_table("touchpoints", schema=None) as batch_op:
        batch_op.drop_constraint("uq_touchpoints_order_key", type_="unique")
        batch_op.drop_column("order_key")
