"""Admission of a creation: start its CreateFromBoxWorkflow run with update-with-start and wait for the run's
`admission` update, which answers once the request is admitted (the VMID is fixed) or refused with the seed's
words. A request not admitted in time answers 503 and is given up, so that it never creates anything, also
later."""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from contextlib import suppress
from datetime import UTC, datetime, timedelta
from typing import Any

from temporalio.client import (
    Client,
    WithStartWorkflowOperation,
    WorkflowFailureError,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from api.errors import ApiError
from api.idempotency import request_memo
from payloads import MSG_CLONE_FAILED, MSG_UNAVAILABLE, Admission, CreateFromBoxInput, status_of
from workflows import CreateFromBoxWorkflow

# After the workflow's own admission deadline, how long the API still listens for its answer.
ADMISSION_GRACE_SECONDS = 2.0
# Waiting for the admission update ends with one of these when the answer does not come in time, or when the
# server cannot be asked.
NOT_IN_TIME = (TimeoutError, WorkflowUpdateRPCTimeoutOrCancelledError, RPCError)


def new_task_id(box_id: str) -> str:
    """clone-<box>-<ms>-<random>: readable in the Web UI, unique without coordination."""
    box = re.sub(r"[^A-Za-z0-9_.-]", "_", box_id)[:64]
    return f"clone-{box}-{int(time.time() * 1000)}-{secrets.token_hex(3)}"


class Admitter:
    def __init__(self, client: Client, task_queue: str, timeout: float):
        self.client = client
        self.task_queue = task_queue
        self.timeout = timeout

    async def admit(self, task_id: str, input: CreateFromBoxInput) -> Admission:
        """Start the run `task_id` and wait for its admission; 503 (and nothing created, ever) if that takes
        longer than the admission timeout. WorkflowAlreadyStartedError if a run of that id is open."""
        input.admit_by = datetime.now(UTC) + timedelta(seconds=self.timeout)
        start = WithStartWorkflowOperation(
            CreateFromBoxWorkflow.run,
            input,
            id=task_id,
            task_queue=self.task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
            memo=request_memo(input),
        )
        try:
            return await asyncio.wait_for(
                self.client.execute_update_with_start_workflow(
                    CreateFromBoxWorkflow.admission, start_workflow_operation=start
                ),
                self.timeout + ADMISSION_GRACE_SECONDS,
            )
        except WorkflowUpdateFailedError as exc:
            raise refusal(exc) from exc
        except WorkflowAlreadyStartedError:
            await take_start_outcome(start)
            raise
        except NOT_IN_TIME as exc:
            await take_start_outcome(start)
            # No worker answered in time, or the server refused: the run (if it started) must not act later.
            # Its own deadline stops it; cancelling it also ends it at once when a worker sees it.
            await give_up(self.client, task_id)
            raise ApiError(503, MSG_UNAVAILABLE) from exc

    async def join(self, task_id: str) -> Admission:
        """Wait for the admission of the run `task_id`, which an earlier request started. That request gives
        the run up if it is not admitted in time; this one only answers 503."""
        try:
            return await asyncio.wait_for(
                self.client.get_workflow_handle(task_id).execute_update(CreateFromBoxWorkflow.admission),
                self.timeout + ADMISSION_GRACE_SECONDS,
            )
        except WorkflowUpdateFailedError as exc:
            raise refusal(exc) from exc
        except NOT_IN_TIME as exc:
            raise ApiError(503, MSG_UNAVAILABLE) from exc

    async def wait_for_end(self, task_id: str, seconds: float) -> None:
        """For ?wait=: answer what the run ended with; a run still going after `seconds` answers as without
        wait."""
        try:
            await asyncio.wait_for(self.client.get_workflow_handle(task_id).result(), seconds)
        except TimeoutError:
            return
        except WorkflowFailureError as exc:
            cause = exc.cause
            if isinstance(cause, ApplicationError):
                raise ApiError(status_of(cause.type), cause.message) from exc
            # Cancelled or terminated by an operator.
            raise ApiError(500, MSG_CLONE_FAILED) from exc


def refusal(exc: WorkflowUpdateFailedError) -> ApiError:
    cause = exc.cause
    if isinstance(cause, ApplicationError):
        return ApiError(status_of(cause.type), cause.message)
    return ApiError(500, MSG_CLONE_FAILED)


async def give_up(client: Client, task_id: str) -> None:
    try:
        await client.get_workflow_handle(task_id).cancel()
    except RPCError as exc:
        if exc.status != RPCStatusCode.NOT_FOUND:
            raise ApiError(503, MSG_UNAVAILABLE) from exc


async def take_start_outcome(start: WithStartWorkflowOperation[Any, Any]) -> None:
    """Take the outcome the SDK hands the start operation besides raising from the update call: an error left
    there is logged as "Future exception was never retrieved". When the update call failed with a start or
    RPC error, a timeout or a cancellation, the SDK has handed it over already (a cancelled call hands over
    CancelledError); the zero timeout keeps a start that never handed anything over from holding the answer.
    The update call's own error already says what happened, so the outcome itself is of no further use."""
    with suppress(TimeoutError, WorkflowAlreadyStartedError, RPCError, asyncio.CancelledError):
        async with asyncio.timeout(0):
            await start.workflow_handle()
