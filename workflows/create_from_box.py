"""CreateFromBoxWorkflow: admit the request, clone the template, configure the VM; undo on failure (saga).

Admission (box, template, permission, PVE checks, plan, quota, VMID) ends before the REST API answers:
the API starts the run with update-with-start and waits on the `admission` update. A parent workflow
can instead run it as a child: admission refusals then fail the run with the seed's message.

Phases after admission: wait for a clone slot (sleeping until a finishing run hands one over), clone, free
the slot, configure and record (the clone's activity frees the slot and configures the VM, where it can:
Admitted.steps_merged and .configure_with_clone; the run's own configuration step, when it has one, records the
VM too, else a local activity does). From the clone on, any failure or cancellation destroys the VM (if it is
this task's) and gives the quota back.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Awaitable
from datetime import datetime, timedelta
from typing import TypeVar

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError, is_cancelled_exception

with workflow.unsafe.imports_passed_through():
    from activities.admission import AdmissionActivities
    from activities.db import DbActivities
    from activities.metrics import count_creation, record_clone, record_slot_wait
    from activities.pve import PveActivities
    from payloads import (
        MSG_CLONE_FAILED,
        MSG_CONFIGURE_FAILED,
        MSG_CREATED,
        PVE_TASK_FAILED_TRANSIENT,
        VMID_TAKEN,
        Admission,
        AdmitInput,
        Admitted,
        CloneInput,
        CloneSlotRequest,
        CloneStarted,
        CreateFromBoxInput,
        CreateFromBoxResult,
        Failure,
        PveTaskRef,
        ReassignInput,
        Step,
        TaskState,
        VmRef,
        status_of,
    )
    from workflows import creation_steps as steps
    from workflows import search_attributes
    from workflows.policies import (
        ADMIT_ATTEMPT,
        CLEANUP_RETRY,
        CLONE_STARTS,
        PVE_BUDGET,
        PVE_HEARTBEAT,
        PVE_RETRY,
        SLOT_RECHECK,
        VMID_CHANGES,
        admission_budget,
        admission_outcome,
        admission_refusal,
        admission_settled,
        db_step,
        error_type,
        innermost_reason,
        is_reset,
        refused_by_its_checks,
        to_the_end,
        watch_clone,
    )
    from workflows.search_attributes import OWNER, SEARCH_ATTRIBUTES, STEP

T = TypeVar("T")

__all__ = ["OWNER", "SEARCH_ATTRIBUTES", "STEP", "CreateFromBoxWorkflow"]  # the keys, for their older importers


@workflow.defn
class CreateFromBoxWorkflow:
    def __init__(self) -> None:
        self._admission: Admission | None = None
        self._refusal: ApplicationError | None = None
        self._state = TaskState(owner="")
        self._admit_by: datetime | None = None
        self._cancelled = False
        self._clone_slot_granted = False
        self._recorded = False  # the VM is recorded as made: nothing undoes it any more
        self._vm = VmRef(task_id="", node="", vmid=0)
        self._box_id = ""
        self._changes_only = False  # see _publish
        self._steps_merged = False  # see Admitted.steps_merged
        self._cloned = CloneStarted(upid=None)  # the clone's activity's answer once it ended well: what it did too

    @workflow.update
    async def admission(self) -> Admission:
        """Answers once the request is admitted (the VMID is fixed), or fails with the refusal."""
        return await admission_outcome(lambda: self._admission, lambda: self._refusal)

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
        self._box_id = input.box_id
        # The caller's deadline applies to the first attempt only: a run reset by an operator (Web UI or
        # `temporal workflow reset`) is a new run of the same chain, long past it, and is admitted anew.
        if is_reset():
            input = dataclasses.replace(input, admit_by=None)
        self._admit_by = input.admit_by
        self._state = TaskState(owner=input.username, vm_name=input.name, node=input.target)
        self._publish(Step.ADMISSION)
        workflow.set_current_details("admitting: checking the box, template, PVE, plan and quota")
        try:
            admitted = await self._admit(input, task_id)
        except (Exception, asyncio.CancelledError) as err:  # not BaseException: eviction must pass through
            refusal = admission_refusal(err)
            self._refusal = refusal  # answers the admission update
            self._cancelled = self._cancelled or is_cancelled_exception(err)
            # Admission is the only phase before anything exists on PVE: give back what it may have held (the
            # clone slot too, unless the checks refused it before asking for one), once it can hold no more.
            await self._uncancellable(admission_settled(err, self._admit_by, ADMIT_ATTEMPT))
            await self._uncancellable(self._release(task_id))
            if not refused_by_its_checks(err):
                await self._release_clone_slot(task_id)
            self._end(Step.DONE, status_of(refusal.type), refusal.message)
            workflow.set_current_details(f"done: not admitted: {refusal.message}")
            await self._uncancellable(workflow.wait_condition(workflow.all_handlers_finished))
            self._raise_if_cancelled(err)
            raise refusal from None

        self._state.vmid = admitted.vmid
        self._changes_only = admitted.changes_only
        self._steps_merged = admitted.steps_merged
        self._admission = Admission(task_id=task_id, vmid=admitted.vmid, vm_name=input.name, node=input.target)
        self._vm = VmRef(task_id=task_id, node=input.target, vmid=admitted.vmid)
        clone = steps.clone_input(self._vm, input, admitted, free_slot=self._steps_merged)
        in_turn = self._clone_in_turn(clone, input, admitted.clone_slot)
        await self._phase(Step.CLONE, in_turn, MSG_CLONE_FAILED, Failure.CLONE_FAILED)
        start = input.start if input.start is not None else admitted.box.start
        step = Step.CLONE if self._cloned.configured else Step.CONFIGURE  # configured with the clone: the record
        configure = self._configure(input, admitted, record=not start)
        await self._phase(step, configure, MSG_CONFIGURE_FAILED, Failure.CONFIGURE_FAILED)
        if start:  # a start that fails is a configuration that failed (the contract)
            await self._phase(Step.START, self._start(input, admitted), MSG_CONFIGURE_FAILED, Failure.CONFIGURE_FAILED)
        self._end(Step.DONE, 200, MSG_CREATED)
        count_creation("succeeded")
        workflow.set_current_details("done")
        return CreateFromBoxResult(vmid=self._vm.vmid, vm_name=input.name, node=input.target, task_id=task_id)

    async def _phase(self, step: Step, work: Awaitable[None], message: str, failure: Failure) -> None:
        """One phase after admission. If it fails or the run is cancelled, undo everything and end the run:
        cancelled if it was cancelled, else failed with `message`. BoxStep moves if `step` is another."""
        if step.value != self._state.step:
            self._publish(step)
        try:
            await work
            if self._cancelled and not self._recorded:
                # Cancelled during a step that had to finish first (freeing the clone slot): it still holds.
                raise asyncio.CancelledError()
        except (Exception, asyncio.CancelledError) as err:
            self._cancelled = self._cancelled or is_cancelled_exception(err)
            destroyed = await self._compensate(self._vm)
            self._end(Step.DONE, 500, message)
            workflow.set_current_details(f"done: {message}; {steps.undone(self._vm.vmid, destroyed)}, quota given back")
            self._raise_if_cancelled(err)
            raise ApplicationError(message, innermost_reason(err), type=failure.value) from None

    # ---------------------------------------------------------------------------- admission

    async def _admit(self, input: CreateFromBoxInput, task_id: str) -> Admitted:
        admitted = await workflow.execute_local_activity_method(
            AdmissionActivities.admit,
            AdmitInput(task_id=task_id, request=input),
            start_to_close_timeout=ADMIT_ATTEMPT,
            schedule_to_close_timeout=admission_budget(self._admit_by, PVE_BUDGET),
            retry_policy=PVE_RETRY,
            summary=f"admit {input.name} for {input.username}",
        )
        # Past the deadline the caller has answered 503 and given the request up: it must create nothing.
        try:
            admission_budget(self._admit_by, timedelta(0))
        except ApplicationError:
            await self._release_clone_slot(task_id)  # asked for at admission (the quota: by the caller)
            raise
        return admitted

    # ---------------------------------------------------------------------------- clone

    async def _clone_in_turn(self, req: CloneInput, input: CreateFromBoxInput, place: int | None) -> None:
        """Wait for a clone slot on the node and storage (`place`: the admission's answer, see
        _wait_for_clone_slot), clone, and free the slot whatever happens."""
        slot = CloneSlotRequest(task_id=req.task_id, node=req.template.node, storage=req.storage, owner=input.username)
        try:
            waiting_since = workflow.now()
            await self._wait_for_clone_slot(slot, place)
            cloning_since = record_slot_wait(waiting_since)
            await self._clone(req, input)
            record_clone(cloning_since)
        except (Exception, asyncio.CancelledError):  # not `finally`: an evicted run must not act
            await self._release_clone_slot(req.task_id)
            raise
        if not self._cloned.slot_freed:
            await self._release_clone_slot(req.task_id)

    async def _wait_for_clone_slot(self, slot: CloneSlotRequest, place: int | None) -> None:
        """Take a free slot, or queue for one and sleep until the run that frees one hands it over (with a
        look every few minutes, in case that word was lost). Waiting costs nothing while it lasts. `place` is
        what admission answered (0: the run holds a slot; N: it is Nth in line), None when it did not ask."""
        where = f"{slot.node}/{slot.storage}"
        if place is None:
            self._clone_slot_granted = False
            place = await self._try_clone_slot(slot, where)
        while place:
            workflow.set_current_details(f"waiting for a clone slot on {where}, number {place} in line")
            with contextlib.suppress(asyncio.TimeoutError):
                await workflow.wait_condition(
                    lambda: self._clone_slot_granted,
                    timeout=SLOT_RECHECK,
                    timeout_summary=f"look again for a clone slot on {where}",
                )
            self._clone_slot_granted = False
            place = await self._try_clone_slot(slot, where)

    async def _try_clone_slot(self, slot: CloneSlotRequest, where: str) -> int:
        return await db_step(DbActivities.try_clone_slot, slot, summary=f"clone slot on {where}?")

    async def _release_clone_slot(self, task_id: str) -> None:
        """Free the slot; the activity tells the runs it is handed to (db.clone_slots.release_and_hand_over)."""
        release = db_step(DbActivities.release_clone_slot, task_id, CLEANUP_RETRY, "free the clone slot")
        await self._uncancellable(release)

    async def _clone(self, req: CloneInput, input: CreateFromBoxInput) -> None:
        vmid_changes = 0
        starts = 0
        while True:
            starts += 1
            try:
                await self._clone_once(req)
                return
            except ActivityError as err:
                if error_type(err) == VMID_TAKEN and vmid_changes < VMID_CHANGES:
                    # A VM made outside the service took our VMID after admission: take another one.
                    vmid_changes += 1
                    steps.move_to_vmid(req, await self._reassign_vmid(req, input))
                    continue
                if error_type(err) == PVE_TASK_FAILED_TRANSIENT and starts < CLONE_STARTS:
                    workflow.logger.warning("clone of VM %s failed on a lock; starting it again", req.vmid)
                    workflow.set_current_details(f"VM {req.vmid}: clone failed on a PVE lock; starting it again")
                    await workflow.sleep(timedelta(seconds=5 * starts), summary="back off before cloning again")
                    continue
                raise

    async def _clone_once(self, req: CloneInput) -> None:
        then = ", then configuring it" if req.configure else ""
        workflow.set_current_details(f"cloning VM {req.vmid} onto {req.target}{then}")
        started = await self._start_clone(req)
        if started.finished:
            self._cloned = started
            return
        if started.upid is not None:
            workflow.set_current_details(f"cloning VM {req.vmid} onto {req.target}: watching PVE task {started.upid}")
            await watch_clone(PveActivities.await_task, PveTaskRef(upid=started.upid), f"watch PVE task {started.upid}")
        else:
            await watch_clone(
                PveActivities.await_clone_by_lock,
                VmRef(task_id=req.task_id, node=req.target, vmid=req.vmid),
                f"watch the clone lock of VM {req.vmid}",
            )

    async def _start_clone(self, req: CloneInput) -> CloneStarted:
        """Ask PVE for the clone. A cancellation that arrives meanwhile waits until the activity has ended: a
        request on its way may still make the VM, and a cleanup that looked before PVE had made it would leave
        it behind. (If PVE keeps failing, that includes the activity's retries, up to PVE_BUDGET.)"""
        request = asyncio.ensure_future(steps.start_clone(req))
        try:
            return await asyncio.shield(request)
        except asyncio.CancelledError:
            self._cancelled = True
        with contextlib.suppress(Exception):  # whatever PVE answered, the run is cancelled and cleans up
            await self._uncancellable(request)
        raise asyncio.CancelledError()

    async def _reassign_vmid(self, req: CloneInput, input: CreateFromBoxInput) -> int:
        facts = await steps.free_vmids(req, input.disk_gb)
        vmid = await db_step(
            DbActivities.reassign_vmid,
            ReassignInput(task_id=req.task_id, free_ranges=facts.free_ranges),
            summary="take another VMID",
        )
        workflow.logger.warning("VMID %s was taken outside the service; the VM will be %s", req.vmid, vmid)
        self._vm = VmRef(task_id=req.task_id, node=req.target, vmid=vmid)
        self._state.vmid = vmid
        self._publish(Step.CLONE)
        return vmid

    # ---------------------------------------------------------------------------- configure

    async def _configure(self, input: CreateFromBoxInput, admitted: Admitted, record: bool) -> None:
        """Configure the VM, unless the clone's activity did, and with `record`, record it."""
        if self._cloned.configure_failure is not None:  # met by the clone's activity, as configure_vm would have
            raise ApplicationError(self._cloned.configure_failure, non_retryable=True)
        if not self._cloned.configured:
            workflow.set_current_details(f"configuring VM {self._vm.vmid}")
            configure = steps.configure_input(self._vm, input, admitted, record=record and self._steps_merged)
            if await steps.configure(configure):
                self._recorded = True
                return
        if record:
            await self._record(input, admitted)

    async def _start(self, input: CreateFromBoxInput, admitted: Admitted) -> None:
        self._state.ip_addresses = await steps.start_and_address(self._vm, admitted.box.wait_for_ip_seconds)
        if not self._changes_only:  # else the addresses are in the memo written as the run ends, a moment later
            self._publish(Step.START)
        await self._record(input, admitted)

    async def _record(self, input: CreateFromBoxInput, admitted: Admitted) -> None:
        # The last step, and to its end: once the VM is recorded, it is the owner's and counts against the plan,
        # so a cancellation that comes meanwhile (a lab cancelled as its VMs are made) is too late to undo it.
        await self._uncancellable(steps.record(steps.finish_input(self._vm, input, admitted, self._state.ip_addresses)))
        self._recorded = True

    # ---------------------------------------------------------------------------- undo

    async def _compensate(self, vm: VmRef) -> bool | None:
        """Undo, in reverse order: the VM (if it exists and is this task's), then the quota; a cancellation that
        comes meanwhile waits. Whether a VM was destroyed (None in a history from before destroy_vm said)."""
        self._publish(Step.CLEANUP)
        workflow.set_current_details(f"cleaning up VM {vm.vmid}: destroying it, then giving the quota back")
        destroyed = await self._uncancellable(
            workflow.execute_activity_method(
                PveActivities.destroy_vm,
                vm,
                start_to_close_timeout=timedelta(minutes=3),
                heartbeat_timeout=PVE_HEARTBEAT,
                retry_policy=CLEANUP_RETRY,
                summary=f"destroy VM {vm.vmid} if it is this task's",
            )
        )
        await self._uncancellable(self._release(vm.task_id))
        return destroyed

    async def _release(self, task_id: str) -> None:
        await steps.give_back_quota(task_id, failed=not self._cancelled)

    async def _uncancellable(self, step: Awaitable[T]) -> T:
        """Await `step` to its end even if the run is cancelled meanwhile; the cancellation is kept for later."""
        return await to_the_end(step, self._keep_cancellation)

    def _keep_cancellation(self) -> None:
        self._cancelled = True

    def _raise_if_cancelled(self, err: BaseException) -> None:
        """A cancelled run ends as cancelled (after its cleanup), not as failed; either end is counted here."""
        cancelled = self._cancelled or is_cancelled_exception(err)
        count_creation("cancelled" if cancelled else "failed")
        if cancelled:
            raise asyncio.CancelledError()

    # ---------------------------------------------------------------------------- state

    def _publish(self, step: Step) -> None:
        """Publish the task's state: the search attributes (BoxStep, VmId, ...) and the memo GET tasks reads.

        Once admitted by this version (`Admitted.changes_only`), the steps between the first and the last move
        only BoxStep and VmId, which the API reads over the memo's, and the memo is written again only as the
        run ends: each write is a command, an event and a visibility update (figure 4 of `make bench`). The
        first step publishes everything in every version: it comes before the admission says which version the
        run is (a run begun by an older worker during a rolling upgrade must replay on a newer one)."""
        self._state.step = step.value
        state = self._state
        if self._changes_only and step is not Step.DONE:
            workflow.upsert_search_attributes(search_attributes.progress(step.value, state.vmid))
            return
        workflow.upsert_memo({"state": dataclasses.asdict(state)})
        workflow.upsert_search_attributes(
            search_attributes.current(state.owner, step.value, box_id=self._box_id, node=state.node, vmid=state.vmid)
        )

    def _end(self, step: Step, code: int, message: str) -> None:
        self._state.result_code = code
        self._state.result_message = message
        self._publish(step)
