"""Every answer is the envelope {code, message, data} with the HTTP status equal to `code`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.auth import API_PREFIX, CHALLENGE, UNAUTHORIZED, bearer_caller
from api.schemas import OWN_ERRORS, ErrorAnswer

log = logging.getLogger("api")

DATABASE_UNAVAILABLE = "Service unavailable: the database cannot be reached, try again later"
TEMPORAL_UNAVAILABLE = "Service unavailable: the workflow service cannot be reached, try again later"


class ApiError(Exception):
    def __init__(self, code: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = headers  # e.g. Retry-After on a 429


def envelope(code: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """An error answer: the ErrorAnswer that /openapi.json documents, `data` null."""
    content = ErrorAnswer(code=code, message=message, data=None).model_dump()
    return JSONResponse(status_code=code, content=content, headers=headers)


def error_responses(answers: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the error answers of an endpoint (status: when it comes). Any other status is
    the same envelope; declaring that as the default also keeps FastAPI from documenting its validation 422,
    which this API answers as a 400 (see `_invalid` below)."""
    responses: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorAnswer, "description": when} for code, when in answers.items()
    }
    responses["default"] = {"model": ErrorAnswer, "description": "Any other error, in the same envelope"}
    return responses


def describe_validation_errors(errors: Sequence[dict[str, Any]]) -> str:
    """One sentence naming the field. An unknown field comes first: `cpu_cores` for `cpuCores` also makes
    `cpuCores` missing, and the unknown name is what tells the client its mistake."""
    if not errors:
        return "Invalid request"
    unknown = [error for error in errors if error.get("type") == "extra_forbidden"]
    return describe_validation_error((unknown or errors)[0])


def describe_validation_error(error: dict[str, Any]) -> str:
    """One sentence naming the field, from one of pydantic's errors."""
    kind = error.get("type", "")
    if kind == "json_invalid":
        return "Invalid request body: not valid JSON"
    where = {"query": "Invalid query parameter", "header": "Invalid header"}.get(
        str((error.get("loc") or ("body",))[0]), "Invalid request body"
    )
    location = [part for part in error.get("loc", ()) if part not in ("body", "query", "path", "header")]
    if not location:
        return f"{where}: expected a JSON object"
    bounds = error.get("ctx") or {}
    # A list's item is named by its list and place ("'targets' item 1"), not by its index alone.
    if isinstance(location[-1], int) and len(location) > 1:
        field = f"'{location[-2]}' item {location[-1]}"
    else:
        field = f"'{location[-1]}'"
    if kind == "missing":
        return f"{where}: {field} is required"
    if kind == "extra_forbidden":
        return f"{where}: unknown field {field}"
    if kind == "greater_than_equal":
        return f"{where}: {field} must be at least {_number(bounds.get('ge'))}"
    if kind == "less_than_equal":
        return f"{where}: {field} must be at most {_number(bounds.get('le'))}"
    if kind.startswith("int") or kind == "greater_than":
        return f"{where}: {field} must be a positive integer"
    if kind.startswith("float") or kind == "finite_number":
        return f"{where}: {field} must be a number"
    if kind == "string_too_long":
        return f"{where}: {field} must be at most {_number(bounds.get('max_length'))} characters"
    if kind.startswith("string"):
        return f"{where}: {field} must be a non-empty string"
    if kind.startswith("bool"):
        return f"{where}: {field} must be true or false"
    if kind == "too_short":
        return f"{where}: {field} must have at least {_items(bounds.get('min_length'))}"
    if kind == "too_long":
        return f"{where}: {field} must have at most {_items(bounds.get('max_length'))}"
    if kind in OWN_ERRORS:
        return f"{where}: {field} {error.get('msg')}"
    return f"{where}: {field}: {error.get('msg', 'invalid value')}"


def _items(count: Any) -> str:
    return "1 item" if count == 1 else f"{count} items"


def _number(bound: Any) -> Any:
    """A bound as the client wrote it: 300, not the 300.0 of a float parameter."""
    return int(bound) if isinstance(bound, float) and bound.is_integer() else bound


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return envelope(exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI reads the body (and the query) before the routes' dependencies look at the token: a request
        # without a valid one is a 401 whatever its body says, as it is with a valid body.
        if request.url.path.startswith(API_PREFIX):
            engine = request.app.state.engine
            if await asyncio.to_thread(bearer_caller, engine, request.headers.get("authorization")) is None:
                return envelope(401, UNAUTHORIZED, CHALLENGE)
        # FastAPI's default 422 never reaches a client: a bad request is a 400 in the envelope.
        return envelope(400, describe_validation_errors(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Starlette's own headers stay (a 405's `Allow`, which HTTP requires).
        return envelope(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(OperationalError)
    async def _database_down(request: Request, exc: OperationalError) -> JSONResponse:
        # The database cannot be reached (or is restarting): the server's trouble, and it may clear.
        log.warning("database unavailable in %s %s: %s", request.method, request.url.path, exc.orig)
        return envelope(503, DATABASE_UNAVAILABLE)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return envelope(500, "Internal server error")
