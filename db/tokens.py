"""Session Bearer tokens: only their SHA-256 is stored."""

import hashlib
import secrets

from sqlalchemy import Engine

from db.engine import session
from db.models import SessionToken

MIN_TOKEN_LENGTH = 32


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


def username_for(engine: Engine, token: str) -> str | None:
    if len(token) < MIN_TOKEN_LENGTH:
        return None
    with session(engine) as db:
        row = db.get(SessionToken, token_hash(token))
        return row.username if row is not None else None
