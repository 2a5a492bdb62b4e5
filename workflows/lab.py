"""LabWorkflow: `count` VMs from one box in one request, as one CreateFromBoxWorkflow child per VM.

Admission checks and holds the whole lab at once (every VM's quota and VMID, all or nothing) before the REST
API answers, as for one VM (update-with-start, the `admission` update). Then each VM is its own creation: its
own task, quota reservation, clone-slot turn and saga. A VM whose creation fails is tried once more on another
target, under its name, with a new task id. Cancelling the lab cancels the creations still running (each
cleans up) and keeps the VMs already made.

The history holds one child per VM (three events each) and one memo update per workflow task in which some
VM's state changed, carrying only the VMs that changed (each is a memo key of its own): about 6 events and 8 KiB
per VM (a lab of 100: 619 events, 753 KiB), well within Temporal's limits without continue-as-new.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.exceptions import (
    ApplicationError,
    ChildWorkflowError,
    FailureError,
    WorkflowAlreadyStartedError,
    is_cancelled_exception,
)
from temporalio.workflow import ParentClosePolicy

with workflow.unsafe.imports_passed_through():
    from activities.lab import LabActivities, creation_input, lab_task_ids, retry_task_id
    from payloads import (
        MSG_UNAVAILABLE,
        CreateFromBoxResult,
        EarlierCreation,
        Failure,
        LabAdmission,
        LabAdmitInput,
        LabAdmitted,
        LabInput,
        LabResult,
        LabStep,
        LabVm,
        LabVmStatus,
        RetryTargetInput,
        Step,
        TaskKind,
        TaskState,
        lab_result_message,
        lab_vm_memo_key,
        status_of,
    )
    from workflows import search_attributes
    from workflows.create_from_box import CreateFromBoxWorkflow
    from workflows.metadata import creation_details, creation_summary
    from workflows.policies import (
        CLEANUP_RETRY,
        DB_TIMEOUT,
        LAB_ADMIT_ATTEMPT,
        PVE_BUDGET,
        PVE_RETRY,
        admission_outcome,
        admission_refusal,
        admission_settled,
        is_reset,
    )
    from workflows.policies import to_the_end as _to_the_end

# How long a reset lab waits before it looks again at a creation it had begun that still runs: doubling from the
# first to the longest (a creation may wait hours for its clone slot; its history stays small meanwhile).
EARLIER_FIRST_PAUSE = timedelta(seconds=2)
EARLIER_LONGEST_PAUSE = timedelta(minutes=5)
# The ApplicationError type of a lab that made only some of its VMs (result_code 500).
LAB_INCOMPLETE = "LabIncomplete"
# The memo keys of the state and of the admission's answer (api/task_state.py, api/idempotency.py read them).
STATE_MEMO = "state"
ADMISSION_MEMO = "admission"


@workflow.defn
class LabWorkflow:
    def __init__(self) -> None:
        self._admission: LabAdmission | None = None
        self._refusal: ApplicationError | None = None
        self._state = TaskState(owner="", kind=TaskKind.LAB.value)  # without its VMs: they are in self._vms
        self._vms: list[LabVm] = []
        self._box_id = ""
        self._cancelled = False
        self._changed: set[int] = set()  # the VMs whose state changed since it was last published

    @workflow.update
    async def admission(self) -> LabAdmission:
        """Answers once the whole lab is admitted (names, VMIDs and nodes fixed), or fails with the refusal."""
        return await admission_outcome(lambda: self._admission, lambda: self._refusal)

    @workflow.query
    def state(self) -> TaskState:
        return dataclasses.replace(self._state, vms=self._vms)

    @workflow.run
    async def run(self, input: LabInput) -> LabResult:
        task_id = workflow.info().workflow_id
        if is_reset():  # see CreateFromBoxWorkflow.run: a reset run is admitted anew, without the old deadline
            input = dataclasses.replace(input, admit_by=None)
        self._box_id = input.box_id
        self._state = TaskState(owner=input.username, vm_name=input.name, kind=TaskKind.LAB.value)
        self._publish(LabStep.ADMISSION)
        workflow.set_current_details(f"admitting a lab of {input.count} VMs")
        try:
            admitted = await self._admit(input, task_id)
        except (Exception, asyncio.CancelledError) as err:  # not BaseException: eviction must pass through
            refusal = admission_refusal(err)
            self._refusal = refusal
            # Admission is the only phase before anything exists on PVE: give back what it may have held (a
            # cancellation can come as its reservations are written, and the run then never sees them), once
            # it can hold no more.
            await self._to_the_end(admission_settled(err, input.admit_by, LAB_ADMIT_ATTEMPT))
            await self._to_the_end(self._release(lab_task_ids(task_id, input.count)))
            self._end(status_of(refusal.type), refusal.message)
            workflow.set_current_details(f"done: not admitted: {refusal.message}")
            await self._to_the_end(workflow.wait_condition(workflow.all_handlers_finished))
            if self._cancelled or is_cancelled_exception(err):
                raise asyncio.CancelledError() from None
            raise refusal from None

        self._vms = admitted.vms
        self._admission = LabAdmission(task_id=task_id, vms=[dataclasses.replace(vm) for vm in admitted.vms])
        # What the POST answered, kept as it was: a repeat under its Idempotency-Key answers it again.
        workflow.upsert_memo({ADMISSION_MEMO: dataclasses.asdict(self._admission)})
        self._changed = set(range(len(self._vms)))
        self._publish(LabStep.VMS)
        publisher = asyncio.create_task(self._keep_state_published())
        try:
            await self._make_all(input, admitted.targets)
        finally:
            publisher.cancel()
        # Every creation of the lab's ids has ended by now: what any of them still holds goes back. That is a
        # creation that never ran (cancelled before it started); a retry never started, holding the quota its
        # first try handed over as it ended (quota.undo_creation); a first try an operator terminated (no undo
        # of its own), whose VM was tried again; and, in a reset run, a VM's first id held again by its
        # admission while the earlier run's retry of it was about to make it. A VM made keeps its quota.
        firsts = lab_task_ids(task_id, input.count)
        await self._to_the_end(self._release([*firsts, *(retry_task_id(first) for first in firsts)]))
        made = sum(vm.status == LabVmStatus.SUCCEEDED for vm in self._vms)
        message = lab_result_message(made, input.count)
        self._end(200 if made == input.count else 500, message)
        workflow.set_current_details(f"done: {message}")
        if self._cancelled:
            raise asyncio.CancelledError()
        if made < input.count:
            raise ApplicationError(message, type=LAB_INCOMPLETE, non_retryable=True)
        return LabResult(vms=self._vms, made=made)

    # ---------------------------------------------------------------------------- admission

    async def _admit(self, input: LabInput, task_id: str) -> LabAdmitted:
        admitted = await workflow.execute_local_activity_method(
            LabActivities.admit_lab,
            LabAdmitInput(task_id=task_id, request=input),
            start_to_close_timeout=LAB_ADMIT_ATTEMPT,
            schedule_to_close_timeout=_budget(input.admit_by, PVE_BUDGET),
            retry_policy=PVE_RETRY,
            summary=f"admit a lab of {input.count} VMs for {input.username}",
        )
        if input.admit_by is not None and workflow.now() > input.admit_by:
            # The caller answered 503 and gave the lab up: it must create nothing (what it held is given back).
            raise ApplicationError(MSG_UNAVAILABLE, type=Failure.UNAVAILABLE.value, non_retryable=True)
        return admitted

    async def _release(self, task_ids: list[str]) -> None:
        await workflow.execute_local_activity_method(
            LabActivities.release_lab,
            task_ids,
            start_to_close_timeout=DB_TIMEOUT,
            retry_policy=CLEANUP_RETRY,
            summary="give back the quota of creations that did not run",
        )

    # ---------------------------------------------------------------------------- the VMs

    async def _make_all(self, input: LabInput, targets: list[str]) -> None:
        """Every VM's creation at once. A cancellation of the lab asks each creation still running to cancel
        (each cleans up), and waits for what each really ended with: one that was recording its VM keeps it."""
        workflow.set_current_details(f"creating {input.count} VMs on {', '.join(targets)}")
        everything = asyncio.gather(*(self._make(vm, input, targets) for vm in self._vms))
        try:
            await asyncio.shield(everything)
        except asyncio.CancelledError:
            self._cancelled = True
            workflow.set_current_details("cancelled: waiting for the running creations to clean up")
            running = [vm.task_id for vm in self._vms if vm.status == LabVmStatus.RUNNING]
            # Asked by id, not by cancelling the tasks that await them: those then see each child's real end.
            asking = [workflow.get_external_workflow_handle(task_id).cancel() for task_id in running]
            await self._to_the_end(asyncio.gather(*asking, return_exceptions=True))  # an ended one cannot be
            await self._to_the_end(everything)

    async def _make(self, vm: LabVm, input: LabInput, targets: list[str]) -> None:
        """One VM: its creation as a child, and once more on another target if it fails. Whatever happens, the
        VM ends with a status: the lab's own run never fails for one of its VMs."""
        first_task_id = vm.task_id
        if is_reset():
            # The run an operator reset may have begun this VM's creation (and its retry): one still running is
            # waited for, and a VM one of them made is the lab's. Starting anew beside either makes a VM twice.
            earlier = await self._earlier_creation([first_task_id, retry_task_id(first_task_id)])
            if earlier.made_by is not None:
                vm.task_id, vm.vmid, vm.node = earlier.made_by, earlier.vmid, earlier.node or vm.node
                self._set(vm, LabVmStatus.SUCCEEDED)
                return
            if self._cancelled:
                self._set(vm, LabVmStatus.CANCELLED)
                return
        for attempt in (1, 2):
            if attempt == 2:
                vm.node = await self._retry_target(targets, vm.node, input.memory_mb)
                if self._cancelled:
                    self._set(vm, LabVmStatus.CANCELLED)  # the lab was cancelled while choosing
                    return
                vm.task_id, vm.vmid = retry_task_id(first_task_id), None
                self._set(vm, LabVmStatus.RUNNING)
            try:
                result = await self._create(vm, input)
            except ChildWorkflowError as err:
                if is_cancelled_exception(err):
                    self._set(vm, LabVmStatus.CANCELLED)
                    return
                workflow.logger.warning("lab VM %s failed on %s: %s", vm.vm_name, vm.node, err.cause)
                self._set(vm, LabVmStatus.FAILED)
                if self._cancelled:
                    return
                continue
            except WorkflowAlreadyStartedError as err:  # its id is taken by a run still going: no VM of it
                workflow.logger.warning("lab VM %s could not be started as %s: %s", vm.vm_name, vm.task_id, err)
                self._set(vm, LabVmStatus.FAILED)
                continue
            vm.vmid, vm.node = result.vmid, result.node
            self._set(vm, LabVmStatus.SUCCEEDED)
            return

    async def _create(self, vm: LabVm, input: LabInput) -> CreateFromBoxResult:
        creation = creation_input(input, vm.vm_name, vm.node)
        initial = TaskState(owner=input.username, vm_name=vm.vm_name, node=vm.node)
        child = await workflow.start_child_workflow(
            CreateFromBoxWorkflow.run,
            creation,
            id=vm.task_id,
            # A lab that is terminated (not cancelled) still lets its creations clean up.
            parent_close_policy=ParentClosePolicy.REQUEST_CANCEL,
            memo={STATE_MEMO: dataclasses.asdict(initial)},
            # With BoxStep, as the API starts a creation: it then publishes only what changes as it goes.
            search_attributes=search_attributes.at_start(
                input.username, box_id=input.box_id, node=vm.node, step=Step.ADMISSION.value
            ),
            static_summary=creation_summary(creation),
            static_details=creation_details(creation),
        )
        if self._cancelled:
            # The lab was cancelled while this start was on its way: its request may have come before the child
            # existed, so ask again now that it does (a second request changes nothing).
            with contextlib.suppress(Exception):
                await workflow.get_external_workflow_handle(vm.task_id).cancel()
        return await child

    async def _earlier_creation(self, task_ids: list[str]) -> EarlierCreation:
        """Looks again, further apart each time, while one of them runs: waiting holds no worker's activity slot
        (those creations need them), only a timer. A cancelled lab asks the one running to cancel, as it asks
        its own creations."""
        pause, asked = EARLIER_FIRST_PAUSE, set()
        while True:
            earlier = await workflow.execute_local_activity_method(
                LabActivities.earlier_creation,
                task_ids,
                start_to_close_timeout=DB_TIMEOUT,
                retry_policy=PVE_RETRY,
                summary="what became of the creations begun before the reset",
            )
            if earlier.running is None:
                return earlier
            if self._cancelled and earlier.running not in asked:
                asked.add(earlier.running)
                with contextlib.suppress(Exception):  # it may have just ended
                    await workflow.get_external_workflow_handle(earlier.running).cancel()
            workflow.set_current_details(f"waiting for {earlier.running}, begun before the reset, to end")
            await workflow.sleep(pause, summary=f"wait for {earlier.running} to end")
            pause = min(pause * 2, EARLIER_LONGEST_PAUSE)

    async def _retry_target(self, targets: list[str], failed: str, memory_mb: int) -> str:
        """Another target for a VM that failed on `failed`; the same one if PVE cannot be asked in time (the
        retry then fails there, or succeeds if what failed has passed)."""
        try:
            return await workflow.execute_local_activity_method(
                LabActivities.retry_target,
                RetryTargetInput(targets=targets, failed=failed, memory_mb=memory_mb),
                start_to_close_timeout=timedelta(seconds=30),
                schedule_to_close_timeout=PVE_BUDGET,
                retry_policy=PVE_RETRY,
                summary="choose another node",
            )
        except FailureError:  # the activity's failure (a local one's comes as its own error, not as ActivityError)
            return failed

    # ---------------------------------------------------------------------------- state

    def _set(self, vm: LabVm, status: LabVmStatus) -> None:
        vm.status = status.value
        self._changed.add(self._vms.index(vm))

    async def _keep_state_published(self) -> None:
        """One memo update per workflow task in which some VM's state changed, however many changed in it."""
        while True:
            await workflow.wait_condition(lambda: bool(self._changed))
            self._publish_vms()

    def _publish_vms(self) -> None:
        """Only the VMs that changed, each under a memo key of its own (payloads.lab_vm_memo_key): the memo
        update, which the history keeps whole, stays small, and the history grows with the VMs, not with
        their square."""
        changed = {lab_vm_memo_key(i): dataclasses.asdict(self._vms[i]) for i in sorted(self._changed)}
        self._changed.clear()
        if changed:
            workflow.upsert_memo(changed)

    def _publish(self, step: LabStep) -> None:
        self._state.step = step.value
        self._publish_vms()
        workflow.upsert_memo({STATE_MEMO: dataclasses.asdict(self._state)})
        workflow.upsert_search_attributes(search_attributes.current(self._state.owner, step.value, box_id=self._box_id))

    def _end(self, code: int, message: str) -> None:
        self._state.result_code = code
        self._state.result_message = message
        self._publish(LabStep.DONE)

    async def _to_the_end(self, step):  # type: ignore[no-untyped-def]
        return await _to_the_end(step, self._keep_cancellation)

    def _keep_cancellation(self) -> None:
        self._cancelled = True


def _budget(admit_by: datetime | None, default: timedelta) -> timedelta:
    """What is left of the caller's admission deadline, else `default` (at least a moment: an expired
    deadline is refused by the activity itself)."""
    if admit_by is None:
        return default
    return max(min(admit_by - workflow.now(), default), timedelta(seconds=1))
