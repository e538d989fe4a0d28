"""experiments X (variants, holdouts, promotions)

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-02 05:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

from kaeru.models import UTCDateTime

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("email_messages", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("variant", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=True)
        )
    op.create_table(
        "experiment_promotions",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
        sa.Column("journey_kind", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column("experiment", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column("variant", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column("promoted_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("reason", sqlmodel.sql.sqltypes.AutoString(length=2000), nullable=False),
        sa.UniqueConstraint("journey_kind", "experiment", name="uq_experiment_promotions"),
    )


def downgrade() -> None:
    op.drop_table("experiment_promotions")
    with op.batch_alter_table("email_messages", schema=None) as batch_op:
        batch_op.drop_column("variant")
