"""A box's options, which make its VMs ready to use: start, wait_for_ip_seconds, cloud_init, pool, tags, network.

Boxes made before this revision get none: not started, no wait, no cloud-init, pool, tags or network.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 07:43:10.023402
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("box", schema=None) as batch_op:
        # sa.false(), not 0: PostgreSQL takes no integer as a boolean's default.
        batch_op.add_column(sa.Column("start", sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column("wait_for_ip_seconds", sa.Integer(), server_default=sa.text("0"), nullable=False))
        batch_op.add_column(sa.Column("cloud_init", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("pool", sa.String(), nullable=True))
        batch_op.add_column(sa.Column("tags", sa.JSON(), server_default=sa.text("'[]'"), nullable=False))
        batch_op.add_column(sa.Column("network", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("box", schema=None) as batch_op:
        batch_op.drop_column("network")
        batch_op.drop_column("tags")
        batch_op.drop_column("pool")
        batch_op.drop_column("cloud_init")
        batch_op.drop_column("wait_for_ip_seconds")
        batch_op.drop_column("start")
