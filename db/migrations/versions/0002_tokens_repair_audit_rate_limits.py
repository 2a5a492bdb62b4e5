"""Token ids, expiry and revocation; the repair tool's audit table; rate limit windows shared by API processes.

Tokens issued before this revision get an id made from their hash (operators never saw one before), no expiry.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 06:39:57.168677
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "rate_limit_window",
        sa.Column("token_hash", sa.String(), nullable=False),
        sa.Column("minute", sa.Integer(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("token_hash", "minute"),
    )
    op.create_table(
        "repair_action",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("action", sa.String(), nullable=False),
        sa.Column("task_id", sa.String(), nullable=False),
        sa.Column("vmid", sa.Integer(), nullable=True),
        sa.Column("node", sa.String(), nullable=False),
        sa.Column("username", sa.String(), nullable=False),
        sa.Column("detail", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("repair_action", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_repair_action_at"), ["at"], unique=False)
        batch_op.create_index(batch_op.f("ix_repair_action_task_id"), ["task_id"], unique=False)

    with op.batch_alter_table("sessiontoken", schema=None) as batch_op:
        batch_op.add_column(sa.Column("id", sa.String(), nullable=True))
        batch_op.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True))
    # The existing tokens' ids: a prefix of their hash is unique enough among one installation's tokens and
    # reveals nothing of the token itself.
    op.execute("UPDATE sessiontoken SET id = 'tok_' || substr(token_hash, 1, 16)")
    with op.batch_alter_table("sessiontoken", schema=None) as batch_op:
        batch_op.alter_column("id", existing_type=sa.String(), nullable=False)
        batch_op.create_index(batch_op.f("ix_sessiontoken_id"), ["id"], unique=True)


def downgrade() -> None:
    with op.batch_alter_table("sessiontoken", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_sessiontoken_id"))
        batch_op.drop_column("revoked_at")
        batch_op.drop_column("expires_at")
        batch_op.drop_column("id")

    with op.batch_alter_table("repair_action", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_repair_action_task_id"))
        batch_op.drop_index(batch_op.f("ix_repair_action_at"))

    op.drop_table("repair_action")
    op.drop_table("rate_limit_window")
