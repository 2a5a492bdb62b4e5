"""Logging of the long-running processes (the API, the worker): LOG_FORMAT=text, or json, one JSON object a
line for a log collector. (`boxctl` prints for a human; its errors stay plain text.)

The standard library's logging with a small formatter, not structlog: the lines that matter come from loggers
we do not own (uvicorn's, the Temporal SDK's workflow and activity loggers with their run ids in `extra`), and a
formatter on the root handler turns all of them into JSON without a second logging system to bridge.

`task_id` and `user` come from a per-request context (`request_context`, `bind`) and, in the worker, from the
SDK's `temporal_workflow` / `temporal_activity` extras. Nothing here reads a secret: the settings hold them as
SecretStr, and no request header or body is logged.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# uvicorn's loggers; in json they hand their records to the root handler instead of printing text themselves.
UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")
# What every LogRecord carries; anything else on a record came through `extra=` and goes into the JSON.
# (uvicorn's `color_message` is its message again, with terminal colour codes.)
_RECORD_FIELDS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}

_context: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("log_context", default=None)


@contextmanager
def request_context() -> Iterator[dict[str, Any]]:
    """A fresh context for one request: what `bind` adds to it appears on every line logged until it ends, in
    this task and in the threads it hands work to (they share the dict, not a copy of it)."""
    fields: dict[str, Any] = {}
    token = _context.set(fields)
    try:
        yield fields
    finally:
        _context.reset(token)


def bind(**fields: Any) -> None:
    """Add fields (`user`, `task_id`) to the current request's context; nothing outside one."""
    current = _context.get()
    if current is not None:
        current.update(fields)


def bound() -> dict[str, Any]:
    return dict(_context.get() or {})


def _task_id_of(extras: dict[str, Any]) -> str | None:
    """The workflow id (our task id) from the SDK's workflow or activity logger extras."""
    for key in ("temporal_workflow", "temporal_activity"):
        info = extras.get(key)
        if isinstance(info, dict) and info.get("workflow_id"):
            return str(info["workflow_id"])
    return None


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        # A name starting with "__" is a library's own bookkeeping (the SDK's `__temporal_error_identifier`).
        extras = {
            key: value for key, value in vars(record).items() if key not in _RECORD_FIELDS and not key.startswith("__")
        }
        line.update(bound())
        line.update(extras)
        task_id = _task_id_of(extras)
        if task_id and "task_id" not in line:
            line["task_id"] = task_id
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        # default=str: an extra the SDK adds later (a datetime, an enum) must not cost the line.
        return json.dumps(line, default=str)


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """Ours on the root logger, so that configuring again replaces it and leaves others (pytest's) alone."""


def configure_logging(log_format: str, level: int = logging.INFO) -> None:
    """Send every logger's records to stderr in `log_format` (text or json). Idempotent."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    handler = _Handler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    if log_format == "json":
        # uvicorn configured these with its own text handlers before it imported the app.
        for name in UVICORN_LOGGERS:
            logger = logging.getLogger(name)
            logger.handlers.clear()
            logger.propagate = True
