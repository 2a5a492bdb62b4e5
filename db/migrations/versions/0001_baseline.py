"""Baseline: the schema as `SQLModel.metadata.create_all` made it before the service had migrations.

Revision ID: 0001
Revises:
Create Date: 2026-11-30

The tables are written out here, frozen, instead of taken from db/models.py: the models move on with later
revisions, and `upgrade()` in db/schema.py compares a database that has tables but no revision with this very
schema before it stamps it as 0001.
"""

from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SCHEMA = sa.MetaData()


def _id(name: str) -> sa.Column[str]:
    return sa.Column(name, sa.String(), primary_key=True)


def _text(name: str, *, nullable: bool = False, index: bool = False) -> sa.Column[str]:
    return sa.Column(name, sa.String(), nullable=nullable, index=index)


def _int(name: str, *, nullable: bool = False, index: bool = False) -> sa.Column[int]:
    return sa.Column(name, sa.Integer(), nullable=nullable, index=index)


def _time(name: str, *, nullable: bool = False, index: bool = False) -> sa.Column[datetime]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable, index=index)


sa.Table(
    "plan",
    SCHEMA,
    _id("id"),
    _text("name"),
    _int("per_vm_cores"),
    _int("per_vm_memory_mb"),
    _int("per_vm_disk_gb"),
    _int("total_cores"),
    _int("total_memory_mb"),
    _int("total_disk_gb"),
    _int("total_vms", nullable=True),
)
sa.Table("app_user", SCHEMA, _id("username"), _text("plan_id", nullable=True))
sa.Table(
    "sessiontoken",
    SCHEMA,
    _id("token_hash"),
    sa.Column("username", sa.String(), sa.ForeignKey("app_user.username"), nullable=False, index=True),
    _time("created_at"),
)
sa.Table(
    "template",
    SCHEMA,
    _id("id"),
    _text("name"),
    _text("node"),
    _int("vmid"),
    sa.Column("public", sa.Boolean(), nullable=False),
)
sa.Table(
    "templateuser",
    SCHEMA,
    sa.Column("template_id", sa.String(), sa.ForeignKey("template.id"), primary_key=True),
    sa.Column("username", sa.String(), sa.ForeignKey("app_user.username"), primary_key=True),
)
sa.Table("box", SCHEMA, _id("id"), _text("name"), _text("template_id"))
sa.Table(
    "reservation",
    SCHEMA,
    _id("task_id"),
    _text("username", index=True),
    _int("cores"),
    _int("memory_mb"),
    _int("disk_gb"),
    _int("vmid", nullable=True),
    _text("state", index=True),
    _time("created_at"),
    _time("updated_at"),
    sa.Index(
        "uq_reservation_held_vmid",
        "vmid",
        unique=True,
        sqlite_where=sa.text("state = 'held'"),
        postgresql_where=sa.text("state = 'held'"),
    ),
)
sa.Table(
    "vm",
    SCHEMA,
    _id("task_id"),
    _text("username", index=True),
    _int("vmid", index=True),
    _text("node"),
    _text("name"),
    _int("cores"),
    _int("memory_mb"),
    _int("disk_gb"),
    _time("created_at"),
    _time("deleted_at", nullable=True),
)
sa.Table(
    "cloneslot", SCHEMA, _id("task_id"), _text("node", index=True), _text("storage", index=True), _time("acquired_at")
)
sa.Table("clonewaiter", SCHEMA, _id("task_id"), _text("node"), _text("storage"), _time("queued_at", index=True))
sa.Table("clonegrant", SCHEMA, _id("task_id"), _text("granted_by", index=True), _time("granted_at"))


def upgrade() -> None:
    SCHEMA.create_all(op.get_bind(), checkfirst=False)


def downgrade() -> None:
    SCHEMA.drop_all(op.get_bind(), checkfirst=False)
