"""connectors R (precomputed recommendations, catalogue)

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-02 06:15:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from kaeru.models import UTCDateTime

revision: str = "0020"
down_revision: str | None = "0019"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("products") as batch:
        batch.add_column(
            sa.Column("available", sa.Boolean(), nullable=False, server_default=sa.true())
        )
    op.create_table(
        "recommendations",
        sa.Column("product_id", sa.String(200), primary_key=True),
        sa.Column("rank", sa.Integer(), primary_key=True),
        sa.Column("recommended_id", sa.String(200), nullable=False),
        sa.Column("together", sa.Integer(), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=False),
    )
    op.create_table(
        "best_sellers",
        sa.Column("rank", sa.Integer(), primary_key=True),
        sa.Column("product_id", sa.String(200), nullable=False),
        sa.Column("orders", sa.Integer(), nullable=False),
    )
    op.create_table(
        "recommendation_refreshes",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("refreshed_at", UTCDateTime(), nullable=False),
        sa.Column("orders", sa.Integer(), nullable=False),
        sa.Column("pairs", sa.Integer(), nullable=False),
        sa.Column("best_sellers", sa.Integer(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("recommendation_refreshes")
    op.drop_table("best_sellers")
    op.drop_table("recommendations")
    with op.batch_alter_table("products") as batch:
        batch.drop_column("available")
