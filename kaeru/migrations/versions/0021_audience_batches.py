"""connectors G (batched audience sync, Google Customer Match)

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-02 06:15:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

from kaeru.models import UTCDateTime

revision: str = "0021"
down_revision: str | None = "0020"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _text(length: int | None = None) -> sqlmodel.sql.sqltypes.AutoString:
    return sqlmodel.sql.sqltypes.AutoString(length=length)


def upgrade() -> None:
    op.create_table(
        "audience_batches",
        sa.Column("id", _ID, nullable=False),
        sa.Column("provider", _text(20), nullable=False),
        sa.Column("audience_id", _text(200), nullable=False),
        sa.Column("joining", sa.Boolean(), nullable=False),
        sa.Column("job", _text(400), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("done_at", UTCDateTime(), nullable=True),
        sa.Column("error", _text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_audience_batches_done_at", "audience_batches", ["done_at"])
    op.create_table(
        "audience_changes",
        sa.Column("id", _ID, nullable=False),
        sa.Column("key", sa.String(length=440), nullable=False),
        sa.Column("change_key", _text(400), nullable=False),
        sa.Column("journey_id", _text(400), nullable=False),
        sa.Column("step", _text(100), nullable=False),
        sa.Column("customer_id", _text(200), nullable=False),
        sa.Column("audience", _text(200), nullable=False),
        sa.Column("provider", _text(20), nullable=False),
        sa.Column("audience_id", _text(200), nullable=False),
        sa.Column("email_sha256", _text(64), nullable=False),
        sa.Column("joining", sa.Boolean(), nullable=False),
        sa.Column("queued_at", UTCDateTime(), nullable=False),
        sa.Column("batch_id", sa.Integer(), nullable=True),
        sa.Column("applied_at", UTCDateTime(), nullable=True),
        sa.Column("outcome", _text(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key"),
    )
    op.create_index("ix_audience_changes_change_key", "audience_changes", ["change_key"])
    op.create_index("ix_audience_changes_journey_id", "audience_changes", ["journey_id"])
    op.create_index("ix_audience_changes_batch_id", "audience_changes", ["batch_id"])
    op.create_index("ix_audience_changes_pending", "audience_changes", ["applied_at", "batch_id"])


def downgrade() -> None:
    op.drop_table("audience_changes")
    op.drop_table("audience_batches")
