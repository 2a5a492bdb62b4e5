"""Alembic's environment: the revisions run on the connection that db/schema.py hands over, inside its transaction
(so an upgrade, with the stamp of a database made before Alembic, is all or nothing)."""

from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlalchemy.types import TypeDecorator
from sqlmodel import SQLModel

from db import models  # noqa: F401  (registers the tables on SQLModel.metadata, the target of --autogenerate)


def render_item(type_: str, obj: Any, _context: AutogenContext) -> str | Literal[False]:
    """Write sqlmodel's column types (AutoString, UTCDateTime) as the SQLAlchemy types they store, so that a
    revision keeps meaning what it meant whatever later sqlmodel versions do with their own types."""
    if type_ == "type" and isinstance(obj, TypeDecorator) and type(obj).__module__.startswith("sqlmodel."):
        return f"sa.{obj.impl!r}"
    return False


context.configure(
    connection=context.config.attributes["connection"],
    target_metadata=SQLModel.metadata,
    # SQLite changes a column only by copying its table: batch mode writes that, and plain ALTERs on PostgreSQL.
    render_as_batch=True,
    render_item=render_item,
)
with context.begin_transaction():
    context.run_migrations()
