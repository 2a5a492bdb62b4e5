"""A task's state as the API reads it: the run's Temporal description and the TaskState the workflow keeps in
its memo, its step and VMID as BoxStep and VmId say (a creation moves those alone until it ends). Read by GET
tasks/{task_id}, POST tasks/{task_id}/cancel, GET tasks (from Temporal's visibility) and by a repeated request
under an Idempotency-Key."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

from temporalio.client import Client, WorkflowExecution, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from api.errors import TEMPORAL_UNAVAILABLE, ApiError
from api.schemas import LabVmState, TaskStateData, TaskStatus
from payloads import LAB_VM_MEMO_KEY, LabVm, LabVmStatus, TaskKind, TaskState
from workflows import CreateFromBoxWorkflow, DeleteVmWorkflow, LabWorkflow, PowerVmWorkflow
from workflows.search_attributes import OWNER, STEP, VMID

log = logging.getLogger("api")

TASK_NOT_FOUND = "Task not found"
# A lab's VMs tried again whose VMIDs GET tasks/{task_id} looks up: this many at once, for this long in all.
RETRIED_LOOKUPS = 8
RETRIED_LOOKUP_SECONDS = 2.0
# The workflows whose runs are a user's tasks (GET tasks/{task_id}); any other run under an id is no task.
TASK_WORKFLOWS = frozenset(w.__name__ for w in (CreateFromBoxWorkflow, DeleteVmWorkflow, PowerVmWorkflow, LabWorkflow))
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
    # One run: a describe() of the newest (GET tasks/{task_id}) or an entry of visibility's listing (GET tasks).
    description: WorkflowExecution
    memo: Mapping[str, Any]

    @cached_property
    def state(self) -> TaskState | None:
        """None until the run has published its state (a run that no worker has picked up yet)."""
        if STATE_MEMO not in self.memo:
            return None
        state = TaskState(**self.memo[STATE_MEMO])
        # A creation the API started moves only BoxStep and VmId until it ends (CreateFromBoxWorkflow._publish);
        # every other run keeps them and its memo alike.
        attributes = self.description.typed_search_attributes
        state.step = attributes.get(STEP) or state.step
        state.vmid = attributes.get(VMID) or state.vmid
        # A lab keeps each VM under a key of its own (workflows.lab), in the order of the keys.
        state.vms = [LabVm(**self.memo[key]) for key in sorted(self.memo) if LAB_VM_MEMO_KEY.fullmatch(key)]
        return state

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
    """The task `task_id` (a creation, a deletion, a power action or a lab) if it is `username`'s; anyone else's
    task, another workflow's run and an unknown id are all the same 404, so that task ids reveal nothing."""
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


async def with_retried_vmids(client: Client, task: Task) -> Task:
    """A running lab's VM tried again on another target is a new creation that fixes its own VMID, which the lab
    learns only when that creation ends: until then it is read from that creation's run (its VmId), as GET
    tasks/{its task_id} shows it. Only a creation this very run of the lab started counts (after a reset, an
    older run's is not the lab's), looked up at most RETRIED_LOOKUPS at once and for RETRIED_LOOKUP_SECONDS in
    all: a VMID that cannot be learnt so stays unknown (null), as before."""
    state = task.state
    if state is None or state.kind != TaskKind.LAB or task.ended:
        return task
    pending = [vm for vm in state.vms if vm.vmid is None and vm.status == LabVmStatus.RUNNING.value]
    if not pending:
        return task
    turns = asyncio.Semaphore(RETRIED_LOOKUPS)

    async def vmid_of(vm: LabVm) -> None:
        async with turns:
            creation = await find_task(client, vm.task_id)
        if creation is None or creation.state is None:
            return
        run = creation.description
        if (
            run.workflow_type == CreateFromBoxWorkflow.__name__
            and (run.parent_id, run.parent_run_id) == (task.id, task.description.run_id)
            and creation.state.owner == state.owner
        ):
            vm.vmid = creation.state.vmid

    try:
        await asyncio.wait_for(asyncio.gather(*(vmid_of(vm) for vm in pending)), RETRIED_LOOKUP_SECONDS)
    except (TimeoutError, RPCError) as exc:
        log.debug("VMIDs of %s's VMs tried again not learnt: %r", task.id, exc)
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
        ip_addresses=list(state.ip_addresses) if state.kind == TaskKind.CREATE else None,
        vms=[LabVmState.of(vm) for vm in state.vms] if state.kind == TaskKind.LAB else None,
    )


def iso(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------ GET tasks: a page of Temporal's visibility


async def page_of_tasks(
    client: Client, username: str, status: TaskStatus | None, limit: int, token: bytes | None
) -> tuple[list[Task], bytes | None]:
    """Up to `limit` of `username`'s tasks, in visibility's own order (running first, then ended ones, the most
    recently ended first), and the token of the next page (None after the last). Visibility's entries carry
    the memo, so no task needs a describe. RPCError if Temporal cannot be asked or refuses `token`."""
    runs = client.list_workflows(tasks_query(username, status), page_size=limit, next_page_token=token)
    await runs.fetch_next_page()
    page = list(runs.current_page or ())
    superseded = await _superseded(client, [run for run in page if run.close_time is not None])
    tasks = []
    for run in page:
        if run.run_id in superseded:
            continue
        task = Task(run.id, run, await run.memo())
        # The owner is checked again: a visibility store that matched too much never shows another's task. A
        # run without a state was not started by this service (the API and the workflows write it at start).
        if task.state is not None and task.state.owner == username:
            tasks.append(task)
    return tasks, runs.next_page_token


def tasks_query(username: str, status: TaskStatus | None) -> str:
    """Visibility's filter for `username`'s tasks (the BoxOwner every task carries from its start), the task
    workflows only, and with `status` those whose runs GET tasks/{task_id} shows with that status."""
    query = f"{OWNER.name} = {quoted(username)} AND WorkflowType IN ({_listed(sorted(TASK_WORKFLOWS))})"
    if status is not None:
        query += f" AND ExecutionStatus IN ({_listed(_visibility_statuses(status))})"
    return query


def quoted(value: str) -> str:
    """`value` as one string literal of Temporal's list filter, whose parser (MySQL's dialect) takes a
    backslash as an escape: with both escaped, no username can end the literal and add to the query."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _listed(values: list[str]) -> str:
    return ", ".join(quoted(value) for value in values)


def _visibility_statuses(status: TaskStatus) -> list[str]:
    """Visibility's names (`Running`, `TimedOut`, ...) of the run statuses that STATUS maps to `status`."""
    return [run.name.title().replace("_", "") for run, shown in STATUS.items() if shown == status]


async def _superseded(client: Client, ended: list[WorkflowExecution]) -> set[str]:
    """The run ids among `ended` of which a newer run has the same workflow id (a reset, or a deletion started
    anew): a task is its newest run, as GET tasks/{task_id} shows it. Only an ended run can be superseded
    (an id has one open run at most), and visibility lists an id's newest run first (an open run first, else
    the one that ended last), so the first run listed per id is its newest; one more listing per page asks
    for all runs of the page's ended ids, those on earlier pages included."""
    if not ended:
        return set()
    newest: dict[str, str] = {}
    async for run in client.list_workflows(f"WorkflowId IN ({_listed(sorted({run.id for run in ended}))})"):
        newest.setdefault(run.id, run.run_id)
    return {run.run_id for run in ended if newest.get(run.id, run.run_id) != run.run_id}
