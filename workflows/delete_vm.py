"""DeleteVmWorkflow: stop a VM, destroy it with its disks, then give its resources back to its owner's plan, in
that order, so that quota is never freed while the VM still exists. A VM already gone from PVE is deleted
all the same; a VMID holding a VM without the creation's marker is never touched, and nothing is freed.

Its workflow id is the deletion's task id, `delete-<creation task id>` (deletion_task_id), so that a VM has
one deletion at a time: start_deletion joins the one that runs. Other workflows run it as a child:

    from workflows import DeleteVmWorkflow, DeleteVmInput
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Coroutine
from datetime import timedelta
from typing import Any, TypeVar

from temporalio import workflow
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.common import RetryPolicy, WorkflowIDConflictPolicy
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.service import RPCError, RPCStatusCode

with workflow.unsafe.imports_passed_through():
    from sqlalchemy import Engine

    from activities.vm_life import VmLifeActivities
    from db.vms import VmRecord, abandon_deletion, begin_deletion
    from payloads import (
        MSG_DELETE_FAILED,
        MSG_DELETED,
        DeleteStep,
        DeleteVmInput,
        DeleteVmResult,
        DeletionDone,
        DeletionFailure,
        DeletionRequest,
        TaskKind,
        TaskState,
        VmToDelete,
    )
    from settings import Settings
    from temporal_client import connect_temporal
    from workflows import search_attributes
    from workflows.metadata import deletion_details, deletion_summary
    from workflows.policies import CLEANUP_RETRY, DB_RETRY, DB_TIMEOUT, innermost_reason, pve_change, to_the_end

T = TypeVar("T")
A = TypeVar("A")

DELETION_PREFIX = "delete-"
# A stop or destroy attempt: its PVE task is awaited inside (activities.vm_life.PVE_TASK_WAIT, twice at most).
PVE_STEP_TIMEOUT = timedelta(minutes=3)


def deletion_task_id(creation_task_id: str) -> str:
    """The task id of a VM's deletion, from the VM's record: the same for every request to delete it."""
    return f"{DELETION_PREFIX}{creation_task_id}"


@workflow.defn
class DeleteVmWorkflow:
    def __init__(self) -> None:
        self._state = TaskState(owner="", kind=TaskKind.DELETE.value, step=DeleteStep.STOP.value)

    @workflow.query
    def state(self) -> TaskState:
        return self._state

    @workflow.run
    async def run(self, input: DeleteVmInput) -> DeleteVmResult:
        task_id = workflow.info().workflow_id
        self._state = initial_state(input)
        self._publish(DeleteStep.STOP)
        # Once started, a deletion goes to its end: a cancel request (the API refuses them; an operator may send
        # one) never leaves a VM stopped but counted, or destroyed but counted.
        vm = await _to_the_end(self._delete(task_id, input))
        self._end(200, MSG_DELETED)
        return DeleteVmResult(vmid=vm.vmid, vm_name=vm.vm_name, node=vm.node, task_id=task_id)

    async def _delete(self, task_id: str, input: DeleteVmInput) -> VmToDelete:
        vm: VmToDelete | None = None
        try:
            vm = await _db(VmLifeActivities.begin_deletion, DeletionRequest(task_id, input.username, input.vmid))
            self._state.vm_name, self._state.node = vm.vm_name, vm.node
            if vm.done:  # this deletion's earlier run deleted it; its VMID may be someone else's by now
                return vm
            self._publish(DeleteStep.STOP)
            await vm_life_step(VmLifeActivities.stop_for_deletion, vm)
            self._publish(DeleteStep.DESTROY)
            await vm_life_step(VmLifeActivities.destroy_for_deletion, vm)
            # The VM is gone: its resources must be given back in the end, however long the database is away.
            await _db(VmLifeActivities.finish_deletion, DeletionDone(task_id, vm.creation_task_id), CLEANUP_RETRY)
            return vm
        except Exception as err:
            failure, message = _failure(err)
            if vm is not None:
                await _db(VmLifeActivities.abandon_deletion, DeletionDone(task_id, vm.creation_task_id), CLEANUP_RETRY)
            self._end(failure.status, message)
            raise ApplicationError(message, innermost_reason(err), type=failure.value, non_retryable=True) from None

    def _publish(self, step: DeleteStep) -> None:
        publish_task_state(self._state, step.value)

    def _end(self, code: int, message: str) -> None:
        self._state.result_code = code
        self._state.result_message = message
        self._publish(DeleteStep.DONE)


def publish_task_state(state: TaskState, step: str) -> None:
    """Where the API and operators read a VM-life task (a deletion, a power action): its memo and its search
    attributes."""
    state.step = step
    workflow.upsert_memo({"state": dataclasses.asdict(state)})
    workflow.upsert_search_attributes(search_attributes.current(state.owner, step, node=state.node, vmid=state.vmid))


def initial_state(input: DeleteVmInput, vm_name: str = "", node: str = "") -> TaskState:
    """The task's state before a worker has read the VM's record (the API knows the name and node already)."""
    return TaskState(
        owner=input.username,
        kind=TaskKind.DELETE.value,
        step=DeleteStep.STOP.value,
        vmid=input.vmid,
        vm_name=vm_name,
        node=node,
    )


async def _to_the_end(work: Coroutine[Any, Any, T]) -> T:
    """Await `work` to its end even if the run is cancelled meanwhile."""
    return await to_the_end(work, lambda: workflow.logger.warning("a deletion is not cancelled halfway"))


def _db(activity: Callable[[VmLifeActivities, A], T], arg: A, retry_policy: RetryPolicy = DB_RETRY) -> Awaitable[T]:
    # Database steps take milliseconds: local activities, no round trip through the server.
    return workflow.execute_local_activity_method(
        activity, arg, start_to_close_timeout=DB_TIMEOUT, retry_policy=retry_policy
    )


def vm_life_step(activity: Callable[[VmLifeActivities, A], T], arg: A) -> Awaitable[T]:
    """A PVE step of a VM's deletion or power action."""
    return pve_change(activity, arg, PVE_STEP_TIMEOUT)


def _failure(err: BaseException) -> tuple[DeletionFailure, str]:
    """What the deletion ends with: the refusals in their own words, anything else `Failed to delete VM`."""
    cause = err.cause if isinstance(err, ActivityError) else err
    if isinstance(cause, ApplicationError) and cause.type in {f.value for f in DeletionFailure}:
        return DeletionFailure(cause.type), cause.message
    return DeletionFailure.DELETE_FAILED, MSG_DELETE_FAILED


# ------------------------------------------------------------------------ starting one (not workflow code)


async def start_deletion(client: Client, task_queue: str, engine: Engine, vm: VmRecord) -> str:
    """Start the deletion of the VM record `vm`, or join the one that runs; returns its task id. One that ended
    (failed) is started anew under the same id. The record is marked as being deleted before the run starts,
    so that listings show it at once, worker or not; the memo holds the task's state from the start, so that
    it reads as a deletion before a worker has picked it up. RPCError if Temporal cannot be asked (the mark is
    then taken back, unless a deletion of it was running already)."""
    task_id = deletion_task_id(vm.task_id)
    input = DeleteVmInput(username=vm.username, vmid=vm.vmid)
    await asyncio.to_thread(begin_deletion, engine, vm.username, vm.vmid, task_id)
    try:
        await client.start_workflow(
            DeleteVmWorkflow.run,
            input,
            id=task_id,
            task_queue=task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            memo={"state": dataclasses.asdict(initial_state(input, vm.name, vm.node))},
            # From the start, so that GET tasks lists it (and operators find it) before a worker has picked it up.
            search_attributes=search_attributes.at_start(input.username, node=vm.node, vmid=vm.vmid),
            static_summary=deletion_summary(input, vm.name),
            static_details=deletion_details(input, vm.name, vm.node),
        )
    except RPCError:
        if vm.deleting_task_id != task_id:
            await asyncio.to_thread(abandon_deletion, engine, vm.task_id, task_id)
        raise
    return task_id


def start_deletion_now(settings: Settings, engine: Engine, vm: VmRecord) -> str:
    """start_deletion for a process without an event loop (boxctl). ConnectionError if Temporal cannot be
    reached or asked."""

    async def start() -> str:
        client = await connect_temporal(settings)
        return await start_deletion(client, settings.temporal_task_queue, engine, vm)

    try:
        return asyncio.run(start())
    except (RPCError, RuntimeError, OSError) as exc:  # Client.connect raises RuntimeError when nobody answers
        raise ConnectionError(f"Temporal at {settings.temporal_address}: {exc}") from exc


def deletion_running(settings: Settings, task_id: str) -> bool:
    """Whether the deletion `task_id` is still going (boxctl asks before it forgets a VM). ConnectionError if
    Temporal cannot be reached or asked."""

    async def running() -> bool:
        client = await connect_temporal(settings)
        try:
            description = await client.get_workflow_handle(task_id).describe()
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                return False
            raise
        return description.status == WorkflowExecutionStatus.RUNNING

    try:
        return asyncio.run(running())
    except (RPCError, RuntimeError, OSError) as exc:
        raise ConnectionError(f"Temporal at {settings.temporal_address}: {exc}") from exc
