"""Every answer is the envelope {code, message, data} with the HTTP status equal to `code`."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.schemas import ErrorAnswer

log = logging.getLogger("api")

TEMPORAL_UNAVAILABLE = "Service unavailable: the workflow service cannot be reached, try again later"


class ApiError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def envelope(code: int, message: str) -> JSONResponse:
    """An error answer: the ErrorAnswer that /openapi.json documents, `data` null."""
    return JSONResponse(status_code=code, content=ErrorAnswer(code=code, message=message, data=None).model_dump())


def error_responses(answers: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for the error answers of an endpoint (status: when it comes). Any other status is
    the same envelope; declaring that as the default also keeps FastAPI from documenting its validation 422,
    which this API answers as a 400 (see `_invalid` below)."""
    responses: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorAnswer, "description": when} for code, when in answers.items()
    }
    responses["default"] = {"model": ErrorAnswer, "description": "Any other error, in the same envelope"}
    return responses


def describe_validation_error(error: dict[str, Any]) -> str:
    """One sentence naming the field, from the first of pydantic's errors."""
    kind = error.get("type", "")
    if kind == "json_invalid":
        return "Invalid request body: not valid JSON"
    where = {"query": "Invalid query parameter", "header": "Invalid header"}.get(
        str((error.get("loc") or ("body",))[0]), "Invalid request body"
    )
    location = [str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path", "header")]
    field = location[-1] if location else None
    if field is None:
        return f"{where}: expected a JSON object"
    if kind == "missing":
        return f"{where}: '{field}' is required"
    if kind.startswith("int") or kind in ("greater_than", "less_than_equal", "greater_than_equal"):
        return f"{where}: '{field}' must be a positive integer"
    if kind.startswith("string"):
        return f"{where}: '{field}' must be a non-empty string"
    return f"{where}: '{field}': {error.get('msg', 'invalid value')}"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return envelope(exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default 422 never reaches a client: a bad request is a 400 in the envelope.
        errors = exc.errors()
        return envelope(400, describe_validation_error(errors[0]) if errors else "Invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return envelope(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return envelope(500, "Internal server error")
