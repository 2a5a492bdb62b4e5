"""Session Bearer tokens: only their SHA-256 is stored. Each has an id for operators, an optional expiry and,
once revoked, a revocation time; an expired or revoked token authenticates nobody."""

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, Row, bindparam
from sqlmodel import col, select, update

from db.engine import reader, session, table_of
from db.models import SessionToken, User, utcnow

MIN_TOKEN_LENGTH = 32


class TokenError(Exception):
    """An operator's token command that cannot be carried out (unknown user or token id)."""


@dataclass(frozen=True)
class Caller:
    """Who sent a request: the user, and which of their tokens (its id for audit lines, its hash to count its
    requests by) without the token itself."""

    username: str
    token_id: str
    token_hash: str


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


def as_utc(value: datetime) -> datetime:
    """SQLite hands datetimes back without their timezone; every one is stored in UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def is_valid(row: SessionToken | Row[Any], now: datetime) -> bool:
    return row.revoked_at is None and (row.expires_at is None or as_utc(row.expires_at) > now)


def lookup(engine: Engine, token: str) -> Caller | None:
    """The caller a Bearer token stands for; None for a token unknown, expired or revoked."""
    if len(token) < MIN_TOKEN_LENGTH:
        return None
    digest = token_hash(token)
    with reader(engine).connect() as db:  # every request asks: it must not wait for writers
        row = db.execute(_TOKEN, {"token_hash": digest}).first()
    if row is None or not is_valid(row, utcnow()):
        return None
    return Caller(username=row.username, token_id=row.id, token_hash=digest)


# Every request asks this, on a thread of its own: a Core statement, built once (see db.engine.table_of).
_tokens = table_of(SessionToken)
_TOKEN = _tokens.select().where(_tokens.c.token_hash == bindparam("token_hash"))


def username_for(engine: Engine, token: str) -> str | None:
    caller = lookup(engine, token)
    return caller.username if caller is not None else None


def issue(engine: Engine, username: str, expires_in: timedelta | None = None) -> tuple[str, SessionToken]:
    """A new token of `username` and its row; the token is returned here once, only its hash is kept."""
    token = new_token()
    with session(engine) as db, db.begin():
        if db.get(User, username) is None:
            raise TokenError(f"user '{username}' is not defined")
        now = utcnow()
        row = SessionToken(
            token_hash=token_hash(token),
            username=username,
            created_at=now,
            expires_at=now + expires_in if expires_in is not None else None,
        )
        db.add(row)
    return token, row


def tokens_of(engine: Engine, username: str) -> list[SessionToken]:
    """A user's tokens, oldest first, revoked and expired ones included."""
    with session(engine) as db:
        if db.get(User, username) is None:
            raise TokenError(f"user '{username}' is not defined")
        query = select(SessionToken).where(SessionToken.username == username)
        return list(db.exec(query.order_by(col(SessionToken.created_at), col(SessionToken.id))).all())


def revoke(engine: Engine, token_id: str) -> tuple[SessionToken, bool]:
    """Revoke the token with this id; returns its row and whether this call revoked it (False: it already was,
    and keeps its first revocation time)."""
    with session(engine) as db, db.begin():
        row = db.exec(select(SessionToken).where(SessionToken.id == token_id)).first()
        if row is None:
            raise TokenError(f"no token has the id '{token_id}'")
        if row.revoked_at is not None:
            return row, False
        row.revoked_at = utcnow()
    return row, True


def revoke_all(engine: Engine, username: str) -> int:
    """Revoke every token of the user not revoked yet; returns how many."""
    with session(engine) as db, db.begin():
        if db.get(User, username) is None:
            raise TokenError(f"user '{username}' is not defined")
        result = db.exec(
            update(SessionToken)
            .where(col(SessionToken.username) == username, col(SessionToken.revoked_at).is_(None))
            .values(revoked_at=utcnow())
        )
        return int(result.rowcount)
