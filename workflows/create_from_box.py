"""CreateFromBoxWorkflow: admit the request, clone the template, configure the VM; undo on failure (saga).

Admission (box, template, permission, PVE checks, plan, quota, VMID) ends before the REST API answers:
the API starts the run with update-with-start and waits on the `admission` update. A parent workflow
can instead run it as a child: admission refusals then fail the run with the seed's message.

Phases after admission: wait for a clone slot (sleeping until a finishing run hands one over), clone, free
the slot, configure and record. From the clone on, any failure or cancellation destroys the VM (if it is this
task's) and gives the quota back.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Awaitable
from datetime import datetime, timedelta
from typing import TypeVar

from temporalio import workflow
from temporalio.common import SearchAttributeKey
from temporalio.exceptions import ActivityError, ApplicationError, is_cancelled_exception

with workflow.unsafe.imports_passed_through():
    from activities.admission import AdmissionActivities
    from activities.db import DbActivities
    from activities.pve import PveActivities
    from payloads import (
        MSG_CLONE_FAILED,
        MSG_CONFIGURE_FAILED,
        MSG_CREATED,
        MSG_UNAVAILABLE,
        PVE_TASK_FAILED_TRANSIENT,
        VMID_TAKEN,
        Admission,
        AdmitInput,
        Admitted,
        CloneInput,
        CloneSlotRequest,
        CloneStarted,
        ConfigureInput,
        CreateFromBoxInput,
        CreateFromBoxResult,
        Failure,
        FinishInput,
        InspectInput,
        PveTaskRef,
        ReassignInput,
        Step,
        TaskState,
        VmRef,
        status_of,
    )
    from workflows.policies import (
        CLEANUP_RETRY,
        CLONE_STARTS,
        PVE_BUDGET,
        PVE_HEARTBEAT,
        PVE_RETRY,
        SLOT_RECHECK,
        VMID_CHANGES,
        db_step,
        innermost_reason,
        pve_change,
        watch_clone,
    )

T = TypeVar("T")

# Custom search attributes, so operators can filter runs in the Web UI; worker.py registers them.
OWNER = SearchAttributeKey.for_keyword("BoxOwner")
STEP = SearchAttributeKey.for_keyword("BoxStep")
SEARCH_ATTRIBUTES = (OWNER, STEP)


@workflow.defn
class CreateFromBoxWorkflow:
    def __init__(self) -> None:
        self._admission: Admission | None = None
        self._refusal: ApplicationError | None = None
        self._state = TaskState(owner="")
        self._admit_by: datetime | None = None
        self._cancelled = False
        self._clone_slot_granted = False
        self._vm = VmRef(task_id="", node="", vmid=0)

    @workflow.update
    async def admission(self) -> Admission:
        """Answers once the request is admitted (the VMID is fixed), or fails with the refusal."""
        await workflow.wait_condition(lambda: self._admission is not None or self._refusal is not None)
        if self._refusal is not None:
            raise self._refusal
        assert self._admission is not None
        return self._admission

    @workflow.query
    def state(self) -> TaskState:
        return self._state

    @workflow.signal
    def clone_slot_granted(self) -> None:
        """A run that freed a clone slot handed it to this one (see workflows.clone_turns)."""
        self._clone_slot_granted = True

    @workflow.run
    async def run(self, input: CreateFromBoxInput) -> CreateFromBoxResult:
        task_id = workflow.info().workflow_id
        self._admit_by = input.admit_by
        self._state = TaskState(owner=input.username, vm_name=input.name, node=input.target)
        self._publish(Step.ADMISSION)
        try:
            admitted = await self._admit(input, task_id)
        except (Exception, asyncio.CancelledError) as err:  # not BaseException: eviction must pass through
            refusal = self._as_refusal(err)
            self._refusal = refusal  # answers the admission update
            # Admission is the only phase before anything exists on PVE: give back what it may have held.
            await self._uncancellable(self._release(task_id))
            self._end(Step.DONE, status_of(refusal.type), refusal.message)
            await self._uncancellable(workflow.wait_condition(workflow.all_handlers_finished))
            self._raise_if_cancelled(err)
            raise refusal from None

        self._state.vmid = admitted.vmid
        self._admission = Admission(task_id=task_id, vmid=admitted.vmid, vm_name=input.name, node=input.target)
        self._vm = VmRef(task_id=task_id, node=input.target, vmid=admitted.vmid)
        clone = CloneInput(task_id, admitted.template, admitted.vmid, input.name, input.target, admitted.facts.storage)
        await self._phase(Step.CLONE, self._clone_in_turn(clone, input), MSG_CLONE_FAILED, Failure.CLONE_FAILED)
        await self._phase(
            Step.CONFIGURE, self._configure(input, admitted), MSG_CONFIGURE_FAILED, Failure.CONFIGURE_FAILED
        )
        self._end(Step.DONE, 200, MSG_CREATED)
        return CreateFromBoxResult(vmid=self._vm.vmid, vm_name=input.name, node=input.target, task_id=task_id)

    async def _phase(self, step: Step, work: Awaitable[None], message: str, failure: Failure) -> None:
        """One phase after admission. If it fails or the run is cancelled, undo everything and end the run:
        cancelled if it was cancelled, else failed with `message`."""
        self._publish(step)
        try:
            await work
            if self._cancelled:
                # Cancelled during a step that had to finish first (freeing the clone slot): it still holds.
                raise asyncio.CancelledError()
        except (Exception, asyncio.CancelledError) as err:
            await self._compensate(self._vm)
            self._end(Step.DONE, 500, message)
            self._raise_if_cancelled(err)
            raise ApplicationError(message, innermost_reason(err), type=failure.value) from None

    # ---------------------------------------------------------------------------- admission

    async def _admit(self, input: CreateFromBoxInput, task_id: str) -> Admitted:
        admitted = await workflow.execute_local_activity_method(
            AdmissionActivities.admit,
            AdmitInput(task_id=task_id, request=input),
            start_to_close_timeout=timedelta(seconds=30),
            schedule_to_close_timeout=self._admission_budget(PVE_BUDGET),
            retry_policy=PVE_RETRY,
        )
        # Past the deadline the caller has answered 503 and given the request up: it must create nothing.
        self._admission_budget(timedelta(0))
        return admitted

    def _admission_budget(self, default: timedelta) -> timedelta:
        """What is left of the caller's admission deadline (a REST request waits for it), else `default`.
        A run that a worker picks up only after that deadline creates nothing."""
        if self._admit_by is None:
            return default
        left = self._admit_by - workflow.now()
        if left <= timedelta(0):
            raise ApplicationError(MSG_UNAVAILABLE, type=Failure.UNAVAILABLE.value, non_retryable=True)
        return min(left, default)

    # ---------------------------------------------------------------------------- clone

    async def _clone_in_turn(self, req: CloneInput, input: CreateFromBoxInput) -> None:
        """Wait for a clone slot on the node and storage, clone, and free the slot whatever happens."""
        slot = CloneSlotRequest(task_id=req.task_id, node=req.template.node, storage=req.storage)
        try:
            await self._wait_for_clone_slot(slot)
            await self._clone(req, input)
        except (Exception, asyncio.CancelledError):  # not `finally`: an evicted run must not act
            await self._release_clone_slot(req.task_id)
            raise
        await self._release_clone_slot(req.task_id)

    async def _wait_for_clone_slot(self, slot: CloneSlotRequest) -> None:
        """Take a free slot, or queue for one and sleep until the run that frees one hands it over (with a
        look every few minutes, in case that word was lost). Waiting costs nothing while it lasts."""
        self._clone_slot_granted = False
        while not await db_step(DbActivities.try_clone_slot, slot):
            with contextlib.suppress(asyncio.TimeoutError):
                await workflow.wait_condition(lambda: self._clone_slot_granted, timeout=SLOT_RECHECK)
            self._clone_slot_granted = False

    async def _release_clone_slot(self, task_id: str) -> None:
        """Free the slot; the activity tells the runs it is handed to (db.clone_slots.release_and_hand_over)."""
        await self._uncancellable(db_step(DbActivities.release_clone_slot, task_id, CLEANUP_RETRY))

    async def _clone(self, req: CloneInput, input: CreateFromBoxInput) -> None:
        vmid_changes = 0
        starts = 0
        while True:
            starts += 1
            try:
                await self._clone_once(req)
                return
            except ActivityError as err:
                if _error_type(err) == VMID_TAKEN and vmid_changes < VMID_CHANGES:
                    # A VM made outside the service took our VMID after admission: take another one.
                    vmid_changes += 1
                    req.vmid = await self._reassign_vmid(req, input)
                    continue
                if _error_type(err) == PVE_TASK_FAILED_TRANSIENT and starts < CLONE_STARTS:
                    workflow.logger.warning("clone of VM %s failed on a lock; starting it again", req.vmid)
                    await workflow.sleep(timedelta(seconds=5 * starts))
                    continue
                raise

    async def _clone_once(self, req: CloneInput) -> None:
        started = await self._start_clone(req)
        if started.finished:
            return
        if started.upid is not None:
            await watch_clone(PveActivities.await_task, PveTaskRef(upid=started.upid))
        else:
            await watch_clone(
                PveActivities.await_clone_by_lock, VmRef(task_id=req.task_id, node=req.target, vmid=req.vmid)
            )

    async def _start_clone(self, req: CloneInput) -> CloneStarted:
        """Ask PVE for the clone. A cancellation that arrives meanwhile waits until the activity has ended: a
        request on its way may still make the VM, and a cleanup that looked before PVE had made it would leave
        it behind. (If PVE keeps failing, that includes the activity's retries, up to PVE_BUDGET.)"""
        request = asyncio.ensure_future(pve_change(PveActivities.start_clone, req, timedelta(seconds=90)))
        try:
            return await asyncio.shield(request)
        except asyncio.CancelledError:
            self._cancelled = True
        with contextlib.suppress(Exception):  # whatever PVE answered, the run is cancelled and cleans up
            await self._uncancellable(request)
        raise asyncio.CancelledError()

    async def _reassign_vmid(self, req: CloneInput, input: CreateFromBoxInput) -> int:
        facts = await workflow.execute_activity_method(
            PveActivities.inspect_template,
            InspectInput(template=req.template, target=req.target, storage=req.storage, disk_gb=input.disk_gb),
            start_to_close_timeout=timedelta(seconds=60),
            schedule_to_close_timeout=PVE_BUDGET,
            retry_policy=PVE_RETRY,
        )
        vmid = await db_step(
            DbActivities.reassign_vmid, ReassignInput(task_id=req.task_id, free_ranges=facts.free_ranges)
        )
        workflow.logger.warning("VMID %s was taken outside the service; the VM will be %s", req.vmid, vmid)
        self._vm = VmRef(task_id=req.task_id, node=req.target, vmid=vmid)
        self._state.vmid = vmid
        self._publish(Step.CLONE)
        return vmid

    # ---------------------------------------------------------------------------- configure

    async def _configure(self, input: CreateFromBoxInput, admitted: Admitted) -> None:
        vm = self._vm
        configure = ConfigureInput(
            task_id=vm.task_id,
            node=vm.node,
            vmid=vm.vmid,
            cpu_cores=input.cpu_cores,
            memory_mb=input.memory_mb,
            disk_key=admitted.facts.disk_key,
            disk_gb=input.disk_gb,
            template_disk_gb=admitted.facts.disk_gb,
        )
        # configure_vm wrote to the VM only while it carried this task's marker. The record that follows asks PVE
        # nothing more: it touches only the database, and a VM that vanishes after configure is the same as one
        # deleted by hand after success (the repair tool marks it deleted; anything under its VMID without the
        # marker is reported, and neither a deletion nor the repair tool acts on it).
        await pve_change(PveActivities.configure_vm, configure, timedelta(minutes=3))
        done = FinishInput(
            vm.task_id,
            input.username,
            vm.vmid,
            vm.node,
            input.name,
            input.cpu_cores,
            input.memory_mb,
            input.disk_gb,
            box_id=input.box_id,
            storage=admitted.facts.storage,
        )
        await db_step(DbActivities.commit_creation, done)

    # ---------------------------------------------------------------------------- undo

    async def _compensate(self, vm: VmRef) -> None:
        """Undo, in reverse order: the VM (if it exists and is this task's), then the quota. A cancellation
        that arrives meanwhile waits until the undo is done."""
        self._publish(Step.CLEANUP)
        await self._uncancellable(
            workflow.execute_activity_method(
                PveActivities.destroy_vm,
                vm,
                start_to_close_timeout=timedelta(minutes=3),
                heartbeat_timeout=PVE_HEARTBEAT,
                retry_policy=CLEANUP_RETRY,
            )
        )
        await self._uncancellable(self._release(vm.task_id))

    async def _release(self, task_id: str) -> None:
        await db_step(DbActivities.release_quota, task_id, CLEANUP_RETRY)

    async def _uncancellable(self, step: Awaitable[T]) -> T:
        """Await `step` to its end even if the run is cancelled meanwhile; the cancellation is kept for later."""
        task = asyncio.ensure_future(step)
        while True:
            try:
                return await asyncio.shield(task)
            except asyncio.CancelledError:
                if task.done():
                    return task.result()
                self._cancelled = True

    def _raise_if_cancelled(self, err: BaseException) -> None:
        """A cancelled run ends as cancelled (after its cleanup), not as failed."""
        if self._cancelled or is_cancelled_exception(err):
            raise asyncio.CancelledError()

    # ---------------------------------------------------------------------------- state

    def _publish(self, step: Step) -> None:
        self._state.step = step.value
        workflow.upsert_memo({"state": dataclasses.asdict(self._state)})
        workflow.upsert_search_attributes([OWNER.value_set(self._state.owner), STEP.value_set(step.value)])

    def _end(self, step: Step, code: int, message: str) -> None:
        self._state.result_code = code
        self._state.result_message = message
        self._publish(step)

    @staticmethod
    def _as_refusal(err: Exception | asyncio.CancelledError) -> ApplicationError:
        """The seed's words for an admission that did not go through."""
        cause = err.cause if isinstance(err, ActivityError) else err
        if isinstance(cause, ApplicationError) and cause.type in {f.value for f in Failure}:
            return ApplicationError(cause.message, type=cause.type, non_retryable=True)
        if is_cancelled_exception(err):
            # Cancelled before anything was made: the REST API gave the request up (and answered 503).
            return ApplicationError(MSG_UNAVAILABLE, "cancelled during admission", type=Failure.UNAVAILABLE.value)
        # PVE or the database did not answer in time, or its retries ran out.
        return ApplicationError(MSG_UNAVAILABLE, innermost_reason(err), type=Failure.UNAVAILABLE.value)


def _error_type(err: ActivityError) -> str | None:
    return err.cause.type if isinstance(err.cause, ApplicationError) else None
