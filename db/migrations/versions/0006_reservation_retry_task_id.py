"""A lab VM's reservation names the task its VM is tried again under, so that the first try's undo hands the
quota over to the retry instead of giving it back (db.quota.undo_creation).

Reservations made before this revision have none: their undo gives the quota back, as before.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 13:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("reservation", schema=None) as batch_op:
        batch_op.add_column(sa.Column("retry_task_id", sa.String(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("reservation", schema=None) as batch_op:
        batch_op.drop_column("retry_task_id")
