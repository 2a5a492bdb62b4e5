"""The database schema's revision, kept by Alembic (db/migrations/): bring a database to the current one, and
refuse to run on any other.

Only `boxctl db upgrade` changes the schema. The API, the worker and the other commands check the revision once
as they start: a process of one version never silently works on tables laid out for another.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, MetaData, inspect

MIGRATIONS = Path(__file__).with_name("migrations")
# The schema that `create_all` made before the service had migrations: such a database is stamped with it.
BASELINE = "0001"
UPGRADE = "run `boxctl db upgrade`"


class SchemaError(Exception):
    """The database is not at the schema this version needs, or cannot be brought to it."""


def alembic_config(connection: Connection | None = None) -> Config:
    """Alembic's settings, made here rather than read from an alembic.ini: they hold wherever the package is
    installed and whatever the working directory. db/migrations/env.py runs on `connection`."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


@cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head() -> str:
    """The revision this version of the code needs."""
    revision = _scripts().get_current_head()
    assert revision is not None, f"no revisions in {MIGRATIONS}"
    return revision


def _known(revision: str) -> bool:
    # Not ScriptDirectory.get_revision: it raises for an unknown id and takes a prefix of a known one.
    return any(script.revision == revision for script in _scripts().walk_revisions())


def baseline_schema() -> MetaData:
    """The tables of revision 0001, frozen there, as `create_all` made them before migrations."""
    schema: MetaData = _scripts().get_revision(BASELINE).module.SCHEMA
    return schema


def state(engine: Engine) -> tuple[str | None, str]:
    """The database's revision (None when Alembic does not manage it: empty, or made before migrations) and
    what it means to this version, with what to run."""
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
        return current, _describe(connection, current)


def require_current(engine: Engine) -> None:
    """Refuse a database that is not at the current schema, an empty one included, saying what to run.
    One look at alembic_version: meant for a process's start, never for each request."""
    current, meaning = state(engine)
    if current != head():
        raise SchemaError(meaning)


def upgrade(engine: Engine) -> str | None:
    """Bring the database to the current schema with its data kept, in one transaction: an empty one gets
    every table; one made by `create_all` before migrations is checked against the baseline and stamped with it
    first. Upgrading a database already at the current schema changes nothing. Answers the revision it was at."""
    with _migration_connection(engine) as connection:
        config = alembic_config(connection)
        current = MigrationContext.configure(connection).get_current_revision()
        if current is not None and not _known(current):
            raise SchemaError(_describe(connection, current))
        if current is None and _has_baseline_tables(connection):
            _require_baseline(connection)
            command.stamp(config, BASELINE)
        command.upgrade(config, "head")
    return current


def _describe(connection: Connection, current: str | None) -> str:
    where = f"database {connection.engine.url.render_as_string(hide_password=True)}"
    if current == head():
        return f"{where} is at the current schema revision ({current})"
    if current is None:
        if _has_baseline_tables(connection):
            return f"{where} was made before schema migrations: {UPGRADE} to bring it under them"
        return f"{where} has no tables yet: {UPGRADE} to create them"
    if not _known(current):
        # A newer version's revision: upgrading cannot help, and going back is that version's business.
        return f"{where} is at schema revision {current}, which this version (at {head()}) does not know"
    return f"{where} is at schema revision {current}, this version needs {head()}: {UPGRADE}"


def _has_baseline_tables(connection: Connection) -> bool:
    return not baseline_schema().tables.keys().isdisjoint(inspect(connection).get_table_names())


def _require_baseline(connection: Connection) -> None:
    """Stamp only what really is the baseline: any other layout would be migrated from a false premise."""
    found = differences(connection, baseline_schema(), other_tables=False)
    if found:
        where = connection.engine.url.render_as_string(hide_password=True)
        raise SchemaError(
            f"database {where} has tables but no schema revision, and they differ from revision {BASELINE} "
            f"(the schema before migrations), so it was left as it was: {found}"
        )


def differences(connection: Connection, metadata: MetaData, *, other_tables: bool = True) -> list[Any]:
    """What Alembic's autogenerate would change to make the database match `metadata` (empty: they match), and
    the conditions of partial indexes, which it does not compare. `other_tables=False` ignores tables that
    `metadata` does not name (other applications' tables in the same database)."""
    opts = {} if other_tables else {"include_name": lambda name, kind, _parents: kind != "table" or name in metadata}
    found: list[Any] = list(compare_metadata(MigrationContext.configure(connection, opts=opts), metadata))
    inspector = inspect(connection)
    dialect = connection.dialect.name
    for table in metadata.tables.values():
        if not inspector.has_table(table.name):
            continue  # already reported as a table to add
        reflected = {
            i["name"]: i.get("dialect_options", {}).get(f"{dialect}_where") for i in inspector.get_indexes(table.name)
        }
        for index in table.indexes:
            if index.name not in reflected:
                continue  # already reported as an index to add
            expected = index.dialect_options[dialect]["where"] if dialect in index.dialect_options else None
            if _condition(expected) != _condition(reflected[index.name]):
                found.append(("modify_index_where", table.name, index.name, str(reflected[index.name]), str(expected)))
    return found


def _condition(where: object) -> str | None:
    """An index's WHERE, spelled alike whoever wrote it: PostgreSQL hands `state = 'held'` back as
    `((state)::text = 'held'::text)`."""
    if where is None:
        return None
    return re.sub(r"::[a-z_ ]+|[()\s]", "", str(where).lower())


@contextmanager
def _migration_connection(engine: Engine) -> Iterator[Connection]:
    """A connection in one transaction for the whole upgrade. On SQLite, foreign keys are off while it runs:
    batch mode changes a table by copying it, and dropping the old copy of a referenced table would fail (or
    cascade). They are checked before the commit instead."""
    with engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            # Before the transaction begins: inside one, the pragma does nothing.
            connection.connection.dbapi_connection.execute("PRAGMA foreign_keys=OFF")  # type: ignore[union-attr]
        try:
            with connection.begin():
                yield connection
                if sqlite and connection.exec_driver_sql("PRAGMA foreign_key_check").first() is not None:
                    raise SchemaError("the upgrade would leave rows that break a foreign key; nothing was changed")
        finally:
            if sqlite:
                connection.connection.dbapi_connection.execute("PRAGMA foreign_keys=ON")  # type: ignore[union-attr]
