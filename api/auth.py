"""The Bearer token of a request, and who it stands for: what every route under API_PREFIX asks first."""

from __future__ import annotations

from sqlalchemy import Engine

from db.tokens import Caller, lookup

# Every route under it needs a valid token.
API_PREFIX = "/api/"
UNAUTHORIZED = "Missing or invalid Bearer token"
# HTTP asks a 401 to name the scheme it wants.
CHALLENGE = {"WWW-Authenticate": "Bearer"}


def bearer_caller(engine: Engine, authorization: str | None) -> Caller | None:
    """The caller of an `Authorization: Bearer <token>` header; None for none, or a token unknown, expired or
    revoked. Reads the database: call it off the event loop."""
    scheme, _, token = (authorization or "").partition(" ")
    return lookup(engine, token.strip()) if scheme.lower() == "bearer" and token.strip() else None
