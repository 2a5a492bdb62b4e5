"""Whose creation holds or waits for each clone slot, so that turns are fair between owners (db.clone_slots).

Slots and waiters made before this revision get the owner '': they count as one owner of their own.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 09:14:59.395859
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("cloneslot", schema=None) as batch_op:
        batch_op.add_column(sa.Column("owner", sa.String(), server_default="", nullable=False))

    with op.batch_alter_table("clonewaiter", schema=None) as batch_op:
        batch_op.add_column(sa.Column("owner", sa.String(), server_default="", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("clonewaiter", schema=None) as batch_op:
        batch_op.drop_column("owner")

    with op.batch_alter_table("cloneslot", schema=None) as batch_op:
        batch_op.drop_column("owner")
