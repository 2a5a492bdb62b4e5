"""Parts of boxctl (the console script, boxctl.py): what every command shares, and the listings."""

from sqlalchemy import Engine

from db.engine import make_engine, missing_database
from db.schema import SchemaError, require_current
from settings import get_settings


class CliError(Exception):
    """A refusal to report as `boxctl: <message>` with exit status 1."""


def open_engine() -> Engine:
    """The database, refused unless it exists (opening a SQLite file that does not would create it) and is at the
    schema this version needs (`boxctl db upgrade` brings it there)."""
    url = get_settings().database_url
    missing = missing_database(url)
    if missing is not None:
        raise CliError(f"{missing} (`boxctl db upgrade` creates it)")
    engine = make_engine(url)
    try:
        require_current(engine)
    except SchemaError as exc:
        engine.dispose()
        raise CliError(str(exc)) from None
    return engine
