"""message topics: each logged message says whether it is marketing, and what it is about

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 23:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Every message logged before this was a cart email: marketing, with no topic.
    with op.batch_alter_table("email_messages", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("marketing", sa.Boolean(), nullable=False, server_default=sa.true())
        )
        batch_op.add_column(
            sa.Column("topic", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=True)
        )
        batch_op.create_index("ix_email_messages_topic", ["customer_id", "topic"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("email_messages", schema=None) as batch_op:
        batch_op.drop_index("ix_email_messages_topic")
        batch_op.drop_column("topic")
        batch_op.drop_column("marketing")
