"""outbox and tracking: opaque tracking tokens and their hit counters

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 20:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

import kaeru.models

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "tracking_links",
        sa.Column("digest", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("message_key", sqlmodel.sql.sqltypes.AutoString(length=400), nullable=False),
        sa.Column("kind", sqlmodel.sql.sqltypes.AutoString(length=1), nullable=False),
        sa.Column("link", sa.Integer(), nullable=True),
        sa.Column("hits", sa.Integer(), nullable=False),
        sa.Column("created_at", kaeru.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("first_hit_at", kaeru.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("last_hit_at", kaeru.models.UTCDateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("digest"),
    )
    with op.batch_alter_table("tracking_links", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_tracking_links_message_key"), ["message_key"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("tracking_links", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_tracking_links_message_key"))
    op.drop_table("tracking_links")
