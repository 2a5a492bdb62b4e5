"""Per-request log context and audit lines.

Every request runs in a fresh log context (logs.request_context): what the dependencies bind to it (`user`
in api/deps.py's current_caller, `task_id` of the path) is on every line logged while it is answered. Each
request that changes something (POST, PUT, PATCH, DELETE: creations, deletions, cancellations, power actions),
and each one refused with 401, 403 or 429, ends with one audit line on the `audit` logger: user, token id,
client address, task id and status code. Never the token, a header or the request body."""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from logs import request_context

log = logging.getLogger("audit")

CHANGING_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
REFUSALS = {401, 403, 429}
# An answer of this API is a few hundred bytes; a larger one is not read for its task id.
MAX_ANSWER_BYTES = 64 * 1024


def _task_id_of_answer(body: bytes) -> str | None:
    """`data.task_id` of an envelope answer (creations, deletions, power actions, cancellations)."""
    try:
        data = json.loads(body).get("data")
    except (ValueError, AttributeError):
        return None
    task_id = data.get("task_id") if isinstance(data, dict) else None
    return task_id if isinstance(task_id, str) else None


class RequestLog:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        answer = bytearray()
        changing = scope["method"] in CHANGING_METHODS

        async def watching_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and changing and len(answer) < MAX_ANSWER_BYTES:
                answer.extend(message.get("body", b""))
            await send(message)

        with request_context() as context:
            try:
                await self.app(scope, receive, watching_send)
            finally:
                if changing or status in REFUSALS:
                    self._audit(scope, status, context, bytes(answer))

    @staticmethod
    def _audit(scope: Scope, status: int, context: dict[str, Any], answer: bytes) -> None:
        caller = scope.get("state", {}).get("caller")
        client = scope.get("client")
        fields = {
            "audit": True,
            "user": getattr(caller, "username", None),
            "token_id": getattr(caller, "token_id", None),
            "client": client[0] if client else None,
            "method": scope["method"],
            "path": scope["path"],
            "task_id": scope.get("path_params", {}).get("task_id") or context.get("task_id"),
            "code": status,
        }
        if fields["task_id"] is None and answer:
            fields["task_id"] = _task_id_of_answer(answer)
        text = " ".join(f"{key}={value}" for key, value in fields.items() if key != "audit" and value is not None)
        log.info("audit %s", text, extra=fields)
