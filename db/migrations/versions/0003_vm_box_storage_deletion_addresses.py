"""A VM record's box and storage (GET vms), the deletion under way, and the guest's addresses.

Records made before this revision get no box or storage (null: not kept then), no deletion, no addresses.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 06:48:33.025860
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("vm", schema=None) as batch_op:
        batch_op.add_column(sa.Column("box_id", sa.String(), nullable=True))
        batch_op.add_column(sa.Column("storage", sa.String(), nullable=True))
        batch_op.add_column(sa.Column("deleting_task_id", sa.String(), nullable=True))
        batch_op.add_column(sa.Column("ip_addresses", sa.JSON(), server_default=sa.text("'[]'"), nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("vm", schema=None) as batch_op:
        batch_op.drop_column("ip_addresses")
        batch_op.drop_column("deleting_task_id")
        batch_op.drop_column("storage")
        batch_op.drop_column("box_id")
