"""journey exactness

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 20:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # One conversion per order and journey kind (stream B, issue 13 item 5).
    with op.batch_alter_table("touchpoints", schema=None) as batch_op:
        batch_op.add_column(sa.Column("order_key", sa.String(length=400), nullable=True))
        batch_op.create_unique_constraint("uq_touchpoints_order_key", ["order_key"])


def downgrade() -> None:
    with op.batch_alter_table("touchpoints", schema=None) as batch_op:
        batch_op.drop_constraint("uq_touchpoints_order_key", type_="unique")
        batch_op.drop_column("order_key")
