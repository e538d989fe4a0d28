"""machine opens: how each open was classified

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02 02:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from kaeru.models import UTCDateTime

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tracking_links", schema=None) as batch_op:
        batch_op.add_column(sa.Column("machine_reason", sa.String(length=30), nullable=True))
        batch_op.add_column(sa.Column("first_human_at", UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tracking_links", schema=None) as batch_op:
        batch_op.drop_column("first_human_at")
        batch_op.drop_column("machine_reason")
