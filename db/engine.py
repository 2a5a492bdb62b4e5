"""Engine creation, with the per-database settings that make the quota reservation atomic."""

from pathlib import Path

from pydantic import SecretStr
from sqlalchemy import Engine, Table, event, make_url
from sqlmodel import Session, SQLModel, create_engine


def make_engine(url: str | SecretStr) -> Engine:
    # Settings.database_url is a SecretStr (it holds the password); SQLAlchemy's URL hides it from then on.
    if isinstance(url, SecretStr):
        url = url.get_secret_value()
    if url.startswith("sqlite"):
        return _sqlite_engine(url)
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def shown_url(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def missing_database(url: str | SecretStr) -> str | None:
    """Why the SQLite database of `url` is missing (None if it is there, or is not SQLite). For the tools that
    must never create one by opening it (boxctl but `db upgrade`, the repair tool): connecting would create the
    file (and make_engine its directory), an empty database in whatever directory a relative path was read from."""
    if isinstance(url, SecretStr):
        url = url.get_secret_value()
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    path = parsed.database or ""
    if path in ("", ":memory:"):
        return f"database {shown_url(url)} is in memory: it holds none of the service's records"
    if not Path(path).is_file():
        return f"database {shown_url(url)} does not exist (no file {path}): is DATABASE_URL right?"
    return None


def _sqlite_engine(url: str) -> Engine:
    path = url.split("///", 1)[-1]
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    # SQLite ignores SELECT ... FOR UPDATE. Taking the write lock when a transaction begins
    # (BEGIN IMMEDIATE) serialises check-then-reserve across threads and processes.
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record):  # type: ignore[no-untyped-def]
        dbapi_connection.isolation_level = None  # let the "begin" handler below emit BEGIN
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection):  # type: ignore[no-untyped-def]
        # A transaction that only reads (see `reader`) reads a snapshot (WAL): it needs no write lock, and
        # taking it would make it wait for every writer's commit, and them for it.
        connection.exec_driver_sql("BEGIN" if connection.get_execution_options().get(READ_ONLY) else "BEGIN IMMEDIATE")

    return engine


READ_ONLY = "pveboxes_read_only"


def reader(engine: Engine) -> Engine:
    """The same engine (and connection pool), for transactions that only read: on SQLite they begin without
    the write lock (a plain BEGIN), where all others take it at once (BEGIN IMMEDIATE)."""
    return engine.execution_options(**{READ_ONLY: True})


def session(engine: Engine) -> Session:
    return Session(engine, expire_on_commit=False)


def table_of(model: type[SQLModel]) -> Table:
    """A model's table, for statements that skip the ORM: on the POST's path and a creation's (the box read, the
    reservation, the record), the ORM's identity map and unit of work cost more than the statements themselves."""
    return model.__table__  # type: ignore[attr-defined,no-any-return]
