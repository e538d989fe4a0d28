"""identity and carts: the cart of each customer, kept at ingestion; merged anonymous ids

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 23:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

import kaeru.models

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "cart_lines",
        sa.Column("customer_id", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column("product_id", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("quantity", sa.Integer(), nullable=False),
        sa.Column("name", sqlmodel.sql.sqltypes.AutoString(length=500), nullable=True),
        sa.Column("price_minor", sa.BigInteger(), nullable=True),
        sa.Column("currency", sqlmodel.sql.sqltypes.AutoString(length=3), nullable=False),
        sa.Column("image_url", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("url", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("updated_at", kaeru.models.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("customer_id", "product_id"),
    )
    op.create_table(
        "identity_aliases",
        sa.Column("anonymous_id", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column("customer_id", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column("message_id", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column("source", sqlmodel.sql.sqltypes.AutoString(length=20), nullable=False),
        sa.Column("merged_at", kaeru.models.UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("anonymous_id"),
    )
    with op.batch_alter_table("identity_aliases", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_identity_aliases_customer_id"), ["customer_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("identity_aliases", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_identity_aliases_customer_id"))
    op.drop_table("identity_aliases")
    op.drop_table("cart_lines")
