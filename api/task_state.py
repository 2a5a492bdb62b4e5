"""A task's state as the API reads it: the run's Temporal description and the TaskState the workflow keeps in
its memo. Read by GET tasks/{task_id} and by a repeated request under an Idempotency-Key."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

from temporalio.client import Client, WorkflowExecutionDescription, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from api.errors import TEMPORAL_UNAVAILABLE, ApiError
from api.schemas import TaskStateData, TaskStatus
from payloads import TaskState
from workflows import CreateFromBoxWorkflow, DeleteVmWorkflow

TASK_NOT_FOUND = "Task not found"
# The workflows whose runs are a user's tasks (GET tasks/{task_id}); any other run under an id is no task.
TASK_WORKFLOWS = frozenset(w.__name__ for w in (CreateFromBoxWorkflow, DeleteVmWorkflow))
# The memo key under which the workflow publishes its TaskState.
STATE_MEMO = "state"
STATUS: dict[WorkflowExecutionStatus, TaskStatus] = {
    WorkflowExecutionStatus.RUNNING: "running",
    WorkflowExecutionStatus.CONTINUED_AS_NEW: "running",
    WorkflowExecutionStatus.COMPLETED: "succeeded",
    WorkflowExecutionStatus.FAILED: "failed",
    WorkflowExecutionStatus.TERMINATED: "failed",
    WorkflowExecutionStatus.TIMED_OUT: "failed",
    WorkflowExecutionStatus.CANCELED: "cancelled",
}


@dataclass
class Task:
    id: str
    description: WorkflowExecutionDescription
    memo: Mapping[str, Any]

    @cached_property
    def state(self) -> TaskState | None:
        """None until the run has published its state (a run that no worker has picked up yet)."""
        return TaskState(**self.memo[STATE_MEMO]) if STATE_MEMO in self.memo else None

    @property
    def ended(self) -> bool:
        return self.description.close_time is not None

    @property
    def status(self) -> TaskStatus:
        status = self.description.status
        return STATUS.get(status, "running") if status else "running"


async def find_task(client: Client, task_id: str) -> Task | None:
    """The run named `task_id`, or None when Temporal has none (an id it cannot take included). Other RPC
    errors are raised: the caller says what being unable to ask means for it."""
    try:
        description = await client.get_workflow_handle(task_id).describe()
    except RPCError as exc:
        if exc.status in (RPCStatusCode.NOT_FOUND, RPCStatusCode.INVALID_ARGUMENT):
            return None
        raise
    return Task(task_id, description, await description.memo())


async def owned_task(client: Client, task_id: str, username: str) -> Task:
    """The task `task_id` (a creation or a deletion) if it is `username`'s; anyone else's task, another
    workflow's run and an unknown id are all the same 404, so that task ids reveal nothing."""
    try:
        task = await find_task(client, task_id)
    except RPCError as exc:
        raise ApiError(503, TEMPORAL_UNAVAILABLE) from exc
    if task is None or task.description.workflow_type not in TASK_WORKFLOWS:
        raise ApiError(404, TASK_NOT_FOUND)
    state = task.state
    if state is None or state.owner != username:
        raise ApiError(404, TASK_NOT_FOUND)
    return task


def state_data(task: Task) -> TaskStateData:
    """GET tasks/{task_id}'s `data` for a task that has published its state."""
    state = task.state
    assert state is not None, "owned_task lets only tasks with a state through"
    return TaskStateData(
        task_id=task.id,
        status=task.status,
        kind=state.kind,
        step=state.step,
        vmid=str(state.vmid) if state.vmid is not None else None,
        vm_name=state.vm_name,
        node=state.node,
        result_code=state.result_code,
        result_message=state.result_message,
        started_at=iso(task.description.start_time),
        finished_at=iso(task.description.close_time),
    )


def iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
