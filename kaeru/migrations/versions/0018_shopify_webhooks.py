"""connectors S (Shopify webhooks): the newest state of each checkout, and its order

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-02 05:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

from kaeru.models import UTCDateTime

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "shopify_checkouts",
        sa.Column("checkout_id", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=True),
        sa.Column("order_id", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=True),
        sa.Column("seen_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("checkout_id"),
    )


def downgrade() -> None:
    op.drop_table("shopify_checkouts")
