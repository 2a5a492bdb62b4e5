"""The caller's tasks: GET /api/v1/vm/manage/tasks (from Temporal's visibility), GET tasks/{task_id} and
POST tasks/{task_id}/cancel.

Endpoints only: a task's state, the one ownership check (`OwnedTask`) and the listing are in api/task_state.py.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Annotated

from fastapi import APIRouter, Query
from temporalio.service import RPCError, RPCStatusCode

from api.deps import UNAUTHORIZED, CurrentUser, OwnedTask, TemporalDep
from api.errors import TEMPORAL_UNAVAILABLE, ApiError, error_responses
from api.routes.vm_manage import one_of
from api.routes.vms import BAD_CURSOR
from api.schemas import TaskAnswer, TasksAnswer, TasksData, TaskStatus
from api.task_state import TASK_NOT_FOUND, page_of_tasks, state_data, with_retried_vmids
from payloads import TaskKind

router = APIRouter(prefix="/api/v1/vm/manage", tags=["tasks"])

MSG_CANCELLATION_REQUESTED = "Cancellation requested"
MSG_ALREADY_ENDED = "Task has already ended"
MSG_NOT_CANCELLABLE = "A deletion cannot be cancelled"
# Once started, these go to their end (a VM stopped but still counted, or half powered, helps nobody).
NOT_CANCELLABLE = frozenset({TaskKind.DELETE.value, TaskKind.POWER.value})
# A visibility page token is a small JSON object (SQL stores: a close time, a start time and a run id); a longer
# `next` is no cursor of ours.
MAX_CURSOR_LENGTH = 2048
# What Temporal answers to a page token it cannot read (the SQL stores fail to decode it: UNKNOWN).
BAD_TOKEN_STATUSES = (RPCStatusCode.INVALID_ARGUMENT, RPCStatusCode.UNKNOWN)


@router.get(
    "/tasks",
    response_description="The caller's tasks in Temporal's own order: running ones first, then ended ones, the most "
    "recently ended first",
    responses=error_responses(
        {
            400: f"A `status`, `limit` or `next` that is not valid (`Invalid query parameter: ...`; {BAD_CURSOR})",
            401: one_of(UNAUTHORIZED),
            503: one_of(TEMPORAL_UNAVAILABLE),
        }
    ),
)
async def list_tasks(
    username: CurrentUser,
    client: TemporalDep,
    status: Annotated[TaskStatus | None, Query(description="only the tasks with this status")] = None,
    limit: Annotated[int, Query(ge=1, le=200, description="tasks per page")] = 50,
    next: Annotated[str | None, Query(description="the cursor from the previous page")] = None,
) -> TasksAnswer:
    token = decode_cursor(next) if next is not None else None
    try:
        tasks, following = await page_of_tasks(client, username, status, limit, token)
    except RPCError as exc:
        if token is not None and exc.status in BAD_TOKEN_STATUSES:
            raise ApiError(400, BAD_CURSOR) from exc
        raise ApiError(503, TEMPORAL_UNAVAILABLE) from exc
    data = TasksData(tasks=[state_data(task) for task in tasks], next=encode_cursor(following) if following else None)
    return TasksAnswer(code=200, message="OK", data=data)


@router.get(
    "/tasks/{task_id}",
    response_description="The state of the caller's task",
    responses=error_responses(
        {401: one_of(UNAUTHORIZED), 404: one_of(TASK_NOT_FOUND), 503: one_of(TEMPORAL_UNAVAILABLE)}
    ),
)
async def get_task(task: OwnedTask, client: TemporalDep) -> TaskAnswer:
    return TaskAnswer(code=200, message="OK", data=state_data(await with_retried_vmids(client, task)))


@router.post(
    "/tasks/{task_id}/cancel",
    response_description="The cancellation was requested: the run cleans up what it made and ends `cancelled`; "
    "`data` is the task's state when it was asked",
    responses=error_responses(
        {
            401: one_of(UNAUTHORIZED),
            404: one_of(TASK_NOT_FOUND),
            409: f"{one_of(MSG_ALREADY_ENDED)}; {one_of(MSG_NOT_CANCELLABLE)} (a deletion or a power action)",
            503: one_of(TEMPORAL_UNAVAILABLE),
        }
    ),
)
async def cancel_task(task: OwnedTask, client: TemporalDep) -> TaskAnswer:
    state = state_data(await with_retried_vmids(client, task))
    if state.kind in NOT_CANCELLABLE:  # whether it runs or not: no deletion is ever cancelled
        raise ApiError(409, MSG_NOT_CANCELLABLE)
    if task.ended:
        raise ApiError(409, MSG_ALREADY_ENDED)
    try:
        # The run that was described: a newer run under the same id (a reset) is not what the caller saw.
        await client.get_workflow_handle(task.id, run_id=task.description.run_id).cancel()
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:  # it ended meanwhile
            raise ApiError(409, MSG_ALREADY_ENDED) from exc
        raise ApiError(503, TEMPORAL_UNAVAILABLE) from exc
    return TaskAnswer(code=200, message=MSG_CANCELLATION_REQUESTED, data=state)


def encode_cursor(token: bytes) -> str:
    """Opaque to clients: visibility's own page token, in base64 (URL-safe)."""
    return base64.urlsafe_b64encode(token).decode()


def decode_cursor(cursor: str) -> bytes:
    """The page token a client sent back. What is not a JSON object in base64 (as every visibility store's
    token is) is a 400 at once: the server fails to decode junk with UNKNOWN, which the SDK retries for seconds."""
    try:
        if len(cursor) > MAX_CURSOR_LENGTH:
            raise ValueError("too long")
        token = base64.b64decode(cursor.encode(), altchars=b"-_", validate=True)
        if not isinstance(json.loads(token), dict):
            raise ValueError("not a JSON object")
    except (binascii.Error, UnicodeError, ValueError, RecursionError) as exc:  # RecursionError: [[[[...
        raise ApiError(400, BAD_CURSOR) from exc
    return token
