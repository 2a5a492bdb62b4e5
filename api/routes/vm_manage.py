"""POST /api/v1/vm/manage/createFromBoxTemplate and GET /api/v1/vm/manage/tasks/{task_id}."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import re
import secrets
import time
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query
from temporalio.client import (
    Client,
    WithStartWorkflowOperation,
    WorkflowExecutionStatus,
    WorkflowFailureError,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.common import WorkflowIDConflictPolicy
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from api.deps import CurrentUser, SettingsDep, TemporalDep
from api.errors import ApiError
from api.schemas import CreateFromBoxRequest, Envelope, valid_vm_name
from payloads import (
    MSG_CLONE_FAILED,
    MSG_CREATED,
    MSG_INVALID_NAME,
    MSG_UNAVAILABLE,
    Admission,
    CreateFromBoxInput,
    TaskState,
    status_of,
)
from workflows import CreateFromBoxWorkflow

router = APIRouter(prefix="/api/v1/vm/manage", tags=["vm manage"])

TASK_NOT_FOUND = "Task not found"
MSG_KEY_REUSED = "This Idempotency-Key was already used with a different request"
# The memo key under which a run keeps the digest of the request that started it.
REQUEST_MEMO = "request"
# After the workflow's own admission deadline, how long the API still listens for its answer.
ADMISSION_GRACE_SECONDS = 2.0
STATUS = {
    WorkflowExecutionStatus.RUNNING: "running",
    WorkflowExecutionStatus.CONTINUED_AS_NEW: "running",
    WorkflowExecutionStatus.COMPLETED: "succeeded",
    WorkflowExecutionStatus.FAILED: "failed",
    WorkflowExecutionStatus.TERMINATED: "failed",
    WorkflowExecutionStatus.TIMED_OUT: "failed",
    WorkflowExecutionStatus.CANCELED: "cancelled",
}


def new_task_id(box_id: str) -> str:
    """clone-<box>-<ms>-<random>: readable in the Web UI, unique without coordination."""
    box = re.sub(r"[^A-Za-z0-9_.-]", "_", box_id)[:64]
    return f"clone-{box}-{int(time.time() * 1000)}-{secrets.token_hex(3)}"


def admission_data(admission: Admission) -> dict[str, Any]:
    return {"task_id": admission.task_id, "vm_name": admission.vm_name, "vmid": str(admission.vmid)}


@router.post("/createFromBoxTemplate", response_model=Envelope)
async def create_from_box_template(
    body: CreateFromBoxRequest,
    username: CurrentUser,
    settings: SettingsDep,
    client: TemporalDep,
    wait: Annotated[float, Query(ge=0, le=3600, description="seconds to wait for the creation to end")] = 0,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=255,
            description="a retried request with the same key returns the first answer and creates nothing",
        ),
    ] = None,
) -> Envelope:
    if not valid_vm_name(body.name):
        raise ApiError(400, MSG_INVALID_NAME)
    input = CreateFromBoxInput(
        username=username,
        box_id=body.box_id,
        name=body.name,
        target=body.target,
        cpu_cores=body.cpu_cores,
        memory_mb=body.memory_mb,
        disk_gb=body.disk_gb,
        storage=body.storage or settings.default_storage,
    )
    admitter = Admitter(client, settings.temporal_task_queue, settings.admission_timeout_seconds)
    if idempotency_key is None:
        admission = await admitter.admit(new_task_id(body.box_id), input)
    else:
        admission = await admitter.admit_once(keyed_task_id(username, idempotency_key), input)
    if wait:
        await wait_for_end(client, admission.task_id, wait)
    return Envelope(code=200, message=MSG_CREATED, data=admission_data(admission))


def keyed_task_id(username: str, key: str) -> str:
    """The same user and Idempotency-Key always name the same run, whichever API process is asked."""
    return "clone-k" + hashlib.sha256(f"{username}\0{key}".encode()).hexdigest()[:32]


def request_digest(input: CreateFromBoxInput) -> str:
    fields = dataclasses.asdict(input)
    fields.pop("admit_by")
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


class Admitter:
    def __init__(self, client: Client, task_queue: str, timeout: float):
        self.client = client
        self.task_queue = task_queue
        self.timeout = timeout

    async def admit(self, task_id: str, input: CreateFromBoxInput) -> Admission:
        """Start the run and wait for its admission update; 503 (and nothing created, ever) if that takes
        longer than the admission timeout."""
        input.admit_by = datetime.now(UTC) + timedelta(seconds=self.timeout)
        start = WithStartWorkflowOperation(
            CreateFromBoxWorkflow.run,
            input,
            id=task_id,
            task_queue=self.task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
            memo={REQUEST_MEMO: request_digest(input)},
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
            raise
        except (TimeoutError, WorkflowUpdateRPCTimeoutOrCancelledError, RPCError) as exc:
            # No worker answered in time, or the server refused: the run (if it started) must not act later.
            # Its own deadline stops it; cancelling it also ends it at once when a worker sees it.
            await give_up(self.client, task_id)
            raise ApiError(503, MSG_UNAVAILABLE) from exc
        finally:
            # Retrieve the start's outcome so that asyncio does not report it as never retrieved.
            if start._workflow_handle.done() and not start._workflow_handle.cancelled():
                start._workflow_handle.exception()

    async def admit_once(self, task_id: str, input: CreateFromBoxInput) -> Admission:
        """Admit under an Idempotency-Key: the first request starts the run; a repeat of it gets the first
        answer; the same key with another request is refused."""
        digest = request_digest(input)
        handle = self.client.get_workflow_handle(task_id)
        for _ in range(3):
            try:
                description = await handle.describe()
            except RPCError as exc:
                if exc.status != RPCStatusCode.NOT_FOUND:
                    raise ApiError(503, MSG_UNAVAILABLE) from exc
                description = None
            memo = await description.memo() if description else {}
            state = TaskState(**memo["state"]) if "state" in memo else None
            gave_up = (
                description is not None
                and description.close_time is not None
                and (state is None or (state.vmid is None and state.result_code == 503))
            )
            if description is None or gave_up:
                # Nothing was created under this key (or the earlier attempt answered 503): start afresh.
                try:
                    return await self.admit(task_id, input)
                except WorkflowAlreadyStartedError:
                    continue  # a concurrent repeat started it first: answer what it answers
            if memo.get(REQUEST_MEMO) != digest:
                raise ApiError(422, MSG_KEY_REUSED)
            if description.close_time is None:
                try:
                    return await asyncio.wait_for(
                        handle.execute_update(CreateFromBoxWorkflow.admission), self.timeout + ADMISSION_GRACE_SECONDS
                    )
                except WorkflowUpdateFailedError as exc:
                    raise refusal(exc) from exc
                except (TimeoutError, WorkflowUpdateRPCTimeoutOrCancelledError, RPCError) as exc:
                    raise ApiError(503, MSG_UNAVAILABLE) from exc
            assert state is not None
            if state.vmid is not None:  # it was admitted: the first answer was the 200
                return Admission(task_id=task_id, vmid=state.vmid, vm_name=state.vm_name, node=state.node)
            raise ApiError(state.result_code or 500, state.result_message or MSG_CLONE_FAILED)
        raise ApiError(503, MSG_UNAVAILABLE)


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


async def wait_for_end(client: Client, task_id: str, seconds: float) -> None:
    """For ?wait=: answer what the run ended with; a run still going after `seconds` answers as without wait."""
    try:
        await asyncio.wait_for(client.get_workflow_handle(task_id).result(), seconds)
    except TimeoutError:
        return
    except WorkflowFailureError as exc:
        cause = exc.cause
        if isinstance(cause, ApplicationError):
            raise ApiError(status_of(cause.type), cause.message) from exc
        # Cancelled or terminated by an operator.
        raise ApiError(500, MSG_CLONE_FAILED) from exc


@router.get("/tasks/{task_id}", response_model=Envelope)
async def get_task(task_id: str, username: CurrentUser, client: TemporalDep) -> Envelope:
    try:
        description = await client.get_workflow_handle(task_id).describe()
    except RPCError as exc:
        if exc.status in (RPCStatusCode.NOT_FOUND, RPCStatusCode.INVALID_ARGUMENT):
            raise ApiError(404, TASK_NOT_FOUND) from exc
        raise ApiError(503, "Service unavailable: the workflow service cannot be reached, try again later") from exc
    if description.workflow_type != "CreateFromBoxWorkflow":
        raise ApiError(404, TASK_NOT_FOUND)
    memo = await description.memo()
    state = TaskState(**memo["state"]) if "state" in memo else None
    if state is None or state.owner != username:
        raise ApiError(404, TASK_NOT_FOUND)
    status = STATUS.get(description.status, "running") if description.status else "running"
    return Envelope(
        code=200,
        message="OK",
        data={
            "task_id": task_id,
            "status": status,
            "step": state.step,
            "vmid": str(state.vmid) if state.vmid is not None else None,
            "vm_name": state.vm_name,
            "node": state.node,
            "result_code": state.result_code,
            "result_message": state.result_message,
            "started_at": iso(description.start_time),
            "finished_at": iso(description.close_time),
        },
    )


def iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
