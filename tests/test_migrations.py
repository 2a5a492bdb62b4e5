"""Schema migrations: `boxctl db upgrade` on an empty database and on one made before Alembic, the models matching
the revisions, and the processes refusing a database at another schema.

tests/data/app-before-alembic.db was made by the code before migrations (commit 1041766): its `init_db`
(`create_all`), `load_admin_data(engine, ADMIN_DATA)` of tests/factories.py, then three reservations (held,
committed, released), two VMs (one deleted), a clone slot, a waiter and a grant, so that every table has rows.
"""

from __future__ import annotations

import logging
import re
import shutil
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from pydantic import SecretStr
from sqlalchemy import Engine
from sqlmodel import SQLModel

import boxctl
import settings as settings_module
import worker
from api.app import create_app
from db import models, quota  # noqa: F401  (models: the tables on SQLModel.metadata, which the revisions must make)
from db.engine import make_engine
from db.schema import BASELINE, SchemaError, baseline_schema, differences, head, state, upgrade
from settings import Settings

BEFORE_ALEMBIC = Path(__file__).parent / "data" / "app-before-alembic.db"
UPGRADE = "run `boxctl db upgrade`"


@pytest.fixture
def before_alembic(tmp_path: Path) -> Path:
    """A copy of the committed database made before migrations (the upgrade changes the file)."""
    copy = tmp_path / "before-alembic.db"
    shutil.copy(BEFORE_ALEMBIC, copy)
    return copy


@pytest.fixture
def engine_for() -> Iterator[Any]:
    engines: list[Engine] = []

    def make(url: str) -> Engine:
        engines.append(make_engine(url))
        return engines[-1]

    yield make
    for engine in engines:
        engine.dispose()


@pytest.fixture
def boxctl_on(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Point boxctl (and every get_settings()) at a database; settings are cached, so clear them on both sides."""

    def point(url: str) -> None:
        monkeypatch.setenv("DATABASE_URL", url)
        settings_module.get_settings.cache_clear()

    yield point
    settings_module.get_settings.cache_clear()


def sqlite_rows(path: Path, columns: dict[str, list[str]] | None = None) -> dict[str, list[tuple[Any, ...]]]:
    """The rows as SQLite stores them (no type conversion in between): of `columns` ({table: [column, ...]}), or
    of every column of every application table."""
    with sqlite3.connect(path) as db:
        if columns is None:
            tables = db.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name != 'alembic_version'")
            columns = {name: ["*"] for (name,) in tables}
        return {t: sorted(db.execute(f'SELECT {", ".join(c)} FROM "{t}"').fetchall()) for t, c in columns.items()}


def sqlite_schema(path: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(path) as db:
        return sorted(db.execute("SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL").fetchall())


def test_database_made_before_migrations_is_upgraded_with_every_row_kept(
    before_alembic: Path, boxctl_on: Any, engine_for: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    assert set(sqlite_rows(before_alembic)) == set(baseline_schema().tables)
    # The baseline's columns: later revisions may add others.
    columns = {t.name: [c.name for c in t.columns] for t in baseline_schema().sorted_tables}
    rows = sqlite_rows(before_alembic, columns)
    assert all(rows.values()), "every table of the committed database has rows"
    boxctl_on(f"sqlite:///{before_alembic}")

    assert boxctl.main(["db", "upgrade"]) == 0

    assert "upgraded from no revision" in capsys.readouterr().out
    assert sqlite_rows(before_alembic, columns) == rows
    engine = engine_for(f"sqlite:///{before_alembic}")
    assert state(engine)[0] == head()
    with engine.connect() as connection:
        assert differences(connection, SQLModel.metadata) == []
    assert boxctl.main(["reservations", "--user", "alice"]) == 0
    assert "clone-running" in capsys.readouterr().out
    # 0005: slots and waiters from before owners were kept belong to no one in particular.
    assert sqlite_rows(before_alembic, {"cloneslot": ["owner"], "clonewaiter": ["owner"]}) == {
        "cloneslot": [("",)],
        "clonewaiter": [("",)],
    }
    # 0006: reservations from before name no retry, so a failed creation's undo gives their quota back.
    held = sqlite_rows(before_alembic, {"reservation": ["task_id", "state", "retry_task_id"]})["reservation"]
    assert ("clone-running", "held", None) in held
    assert quota.undo_creation(engine, "clone-running", hand_over=True) is True
    after = sqlite_rows(before_alembic, {"reservation": ["task_id", "state", "retry_task_id"]})["reservation"]
    assert sorted(after) == sorted([r for r in held if r[0] != "clone-running"] + [("clone-running", "released", None)])


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
def test_empty_database_is_upgraded_to_the_models(database_url: str, engine_for: Any) -> None:
    """Also the guard of every model change: a column, index or table added to db/models.py without a revision
    makes the database that the revisions build differ from the models, and this test fail."""
    engine = engine_for(database_url)
    assert upgrade(engine) is None
    assert state(engine)[0] == head()
    with engine.connect() as connection:
        assert differences(connection, SQLModel.metadata) == []


def _with_column(metadata: sa.MetaData) -> None:
    metadata.tables["vm"].append_column(sa.Column("pool", sa.String(), nullable=True))


def _vmid_required(metadata: sa.MetaData) -> None:
    metadata.tables["reservation"].c.vmid.nullable = False


def _index_condition(metadata: sa.MetaData) -> None:
    (index,) = (i for i in metadata.tables["reservation"].indexes if i.name == "uq_reservation_held_vmid")
    index.dialect_options["sqlite"]["where"] = sa.text("state = 'committed'")


@pytest.mark.parametrize("change", [_with_column, _vmid_required, _index_condition])
def test_the_guard_sees_a_model_change_without_a_revision(change: Any, tmp_path: Path, engine_for: Any) -> None:
    engine = engine_for(f"sqlite:///{tmp_path}/app.db")
    upgrade(engine)
    changed = sa.MetaData()
    for table in SQLModel.metadata.sorted_tables:
        table.to_metadata(changed)
    change(changed)
    with engine.connect() as connection:
        assert differences(connection, changed) != []


def baseline_rows(engine: Engine) -> dict[str, list[dict[str, Any]]]:
    with engine.connect() as connection:
        return {
            t.name: [
                # SQLite hands the times back without their zone; they are in UTC.
                {k: v.replace(tzinfo=UTC) if isinstance(v, datetime) and not v.tzinfo else v for k, v in r.items()}
                for r in connection.execute(sa.select(t).order_by(*t.primary_key.columns)).mappings()
            ]
            for t in baseline_schema().sorted_tables
        }


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_postgresql_database_made_before_migrations_is_upgraded_with_every_row_kept(
    database_url: str, before_alembic: Path, engine_for: Any
) -> None:
    """The tables made as `create_all` made them on PostgreSQL (the baseline's, identical), with the committed
    file's rows."""
    engine = engine_for(database_url)
    rows = baseline_rows(engine_for(f"sqlite:///{before_alembic}"))
    with engine.begin() as connection:
        baseline_schema().create_all(connection)
        for table in baseline_schema().sorted_tables:
            connection.execute(table.insert(), rows[table.name])

    assert upgrade(engine) is None

    assert state(engine)[0] == head()
    assert baseline_rows(engine) == rows
    with engine.connect() as connection:
        owners = [connection.execute(sa.text(f"SELECT owner FROM {t}")).all() for t in ("cloneslot", "clonewaiter")]
    assert owners == [[("",)], [("",)]]  # 0005: rows from before owners were kept
    with engine.connect() as connection:
        retries = connection.execute(sa.text("SELECT DISTINCT retry_task_id FROM reservation")).all()
    assert retries == [(None,)]  # 0006: rows from before name no retry
    with engine.connect() as connection:
        assert differences(connection, SQLModel.metadata) == []


def test_upgrading_twice_changes_nothing(before_alembic: Path, engine_for: Any) -> None:
    engine = engine_for(f"sqlite:///{before_alembic}")
    upgrade(engine)
    rows, layout = sqlite_rows(before_alembic), sqlite_schema(before_alembic)

    assert upgrade(engine) == head()

    assert (sqlite_rows(before_alembic), sqlite_schema(before_alembic)) == (rows, layout)
    with sqlite3.connect(before_alembic) as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [(head(),)]


def test_tables_unlike_the_baseline_are_left_as_they_were(before_alembic: Path, engine_for: Any) -> None:
    with sqlite3.connect(before_alembic) as db:
        db.execute("ALTER TABLE vm DROP COLUMN deleted_at")
    layout = sqlite_schema(before_alembic)
    engine = engine_for(f"sqlite:///{before_alembic}")

    with pytest.raises(SchemaError, match=f"differ from revision {BASELINE}"):
        upgrade(engine)

    assert sqlite_schema(before_alembic) == layout


# ------------------------------------------------------------------ every process refuses another schema


@pytest.fixture(params=["empty", "made before migrations", "unknown revision"])
def not_current(
    request: pytest.FixtureRequest, tmp_path: Path, before_alembic: Path, engine_for: Any
) -> tuple[str, str]:
    """A database that is not at the current schema, and what the refusal says about it."""
    if request.param == "empty":
        sqlite3.connect(tmp_path / "empty.db").close()  # a database file with no tables
        return f"sqlite:///{tmp_path}/empty.db", f"has no tables yet: {UPGRADE}"
    url = f"sqlite:///{before_alembic}"
    if request.param == "made before migrations":
        return url, f"was made before schema migrations: {UPGRADE}"
    upgrade(engine_for(url))
    with sqlite3.connect(before_alembic) as db:
        db.execute("UPDATE alembic_version SET version_num = '9999'")
    return url, f"at schema revision 9999, which this version (at {head()}) does not know"


async def test_api_refuses_to_start(not_current: tuple[str, str]) -> None:
    url, message = not_current
    app = create_app(Settings(_env_file=None, database_url=SecretStr(url)))  # type: ignore[call-arg]

    with pytest.raises(SchemaError, match=re.escape(message)):
        async with app.router.lifespan_context(app):
            pass


async def test_worker_refuses_to_start(
    not_current: tuple[str, str], boxctl_on: Any, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, message = not_current
    # Were the database let through, the worker would fail on this Temporal address instead.
    monkeypatch.setenv("TEMPORAL_ADDRESS", "127.0.0.1:1")
    boxctl_on(url)

    with caplog.at_level(logging.ERROR, logger="worker"), pytest.raises(SystemExit) as exit_:
        await worker.main()

    assert exit_.value.code == 1
    assert message in caplog.text


@pytest.mark.parametrize("command", [["plans"], ["token", "issue", "alice"], ["db", "current"]])
def test_boxctl_refuses(
    command: list[str], not_current: tuple[str, str], boxctl_on: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    url, message = not_current
    boxctl_on(url)

    assert boxctl.main(command) == 1

    captured = capsys.readouterr()
    assert message in captured.err + captured.out  # `db current` answers on stdout, the refusals on stderr


@pytest.mark.parametrize("command", [["plans"], ["token", "issue", "alice"], ["db", "current"], ["load", "x.json"]])
def test_boxctl_refuses_a_database_that_does_not_exist_and_creates_none(
    command: list[str], tmp_path: Path, boxctl_on: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """Run from another directory, a relative DATABASE_URL names a file that is not there: opening it would
    create an empty database there, which `db upgrade` would then fill instead of the service's own."""
    nowhere = tmp_path / "var" / "app.db"
    boxctl_on(f"sqlite:///{nowhere}")
    (tmp_path / "x.json").write_text("{}")

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        assert boxctl.main(command) == 1

    captured = capsys.readouterr()
    assert f"does not exist (no file {nowhere}): is DATABASE_URL right?" in captured.err + captured.out
    assert not nowhere.exists() and not nowhere.parent.exists()
