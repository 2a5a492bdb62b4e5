"""CreateFromBoxWorkflow: admit the request, clone the template, configure the VM; undo on failure (saga).

Admission (box, template, permission, PVE checks, plan, quota, VMID) ends before the REST API answers:
the API starts the run with update-with-start and waits on the `admission` update. A parent workflow
can instead run it as a child: admission refusals then fail the run with the seed's message.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Awaitable
from datetime import datetime, timedelta
from typing import TypeVar

from temporalio import workflow
from temporalio.common import RetryPolicy, SearchAttributeKey
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
        PVE_TASK_FAILED,
        PVE_TASK_FAILED_TRANSIENT,
        VMID_TAKEN,
        Admission,
        AdmitInput,
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
        ReserveInput,
        ResolveBoxInput,
        Step,
        TaskState,
        TemplateFacts,
        TemplateRef,
        VmRef,
        status_of,
    )

T = TypeVar("T")

# Custom search attributes, so operators can filter runs in the Web UI; worker.py registers them.
OWNER = SearchAttributeKey.for_keyword("BoxOwner")
STEP = SearchAttributeKey.for_keyword("BoxStep")
SEARCH_ATTRIBUTES = (OWNER, STEP)

FINAL_FAILURES = [f.value for f in Failure] + [PVE_TASK_FAILED, PVE_TASK_FAILED_TRANSIENT, VMID_TAKEN]

# PVE calls: dropped connections, lock timeouts and 5xx are retried with backoff for a while (PVE_BUDGET),
# then the step fails. A budget of time, not of attempts: a step of several requests on a network that
# drops one in four fails most attempts, yet succeeds within a minute. At most 10 s between attempts: a
# PVE lock or a node that comes back is used soon after.
PVE_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=10),
    non_retryable_error_types=FINAL_FAILURES,
)
PVE_BUDGET = timedelta(minutes=5)
# Activities that change PVE heartbeat every 2 s even while blocked in a PVE call: a worker killed in the
# middle of one is noticed this soon, and the step goes on elsewhere.
PVE_HEARTBEAT = timedelta(seconds=10)
# Waiting for a long PVE task: each attempt is one look, a retry the next. Nothing is held between looks,
# and they grow apart with the task's age, to one every 20 s.
POLL_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=1.5,
    maximum_interval=timedelta(seconds=20),
    non_retryable_error_types=FINAL_FAILURES,
)
# Cleanup must happen in the end, however long PVE is in trouble.
CLEANUP_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=1),
)
DB_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=200),
    maximum_attempts=10,
    non_retryable_error_types=FINAL_FAILURES,
)
# Waiting for a clone slot: look again soon at first, then every 15 s at most.
SLOT_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=1.5,
    maximum_interval=timedelta(seconds=15),
)
CLONE_TIMEOUT = timedelta(hours=2)
VMID_CHANGES = 3  # how often a VMID taken outside the service is replaced before the clone fails
CLONE_SLOTS_PATCH = "clone-slots"
LOCAL_ADMISSION_PATCH = "admission-in-one-local-activity"
SLOT_HANDOFF_PATCH = "clone-slot-hand-over"
CANCEL_AFTER_SLOT_PATCH = "cancel-kept-across-slot-release"
CLONE_REQUEST_KEPT_PATCH = "clone-request-answered-before-cancel"
SLOT_RECHECK = timedelta(minutes=5)  # a waiting run looks at the queue this often even if nobody tells it
CLONE_STARTS = 3  # a clone that failed on a lock another task held is started again, this often


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

    @workflow.run
    async def run(self, input: CreateFromBoxInput) -> CreateFromBoxResult:
        task_id = workflow.info().workflow_id
        self._admit_by = input.admit_by
        self._state = TaskState(owner=input.username, vm_name=input.name, node=input.target)
        self._publish(Step.ADMISSION)
        try:
            template, facts, vmid = await self._admit(input, task_id)
        except (Exception, asyncio.CancelledError) as err:  # not BaseException: eviction must pass through
            refusal = self._as_refusal(err)
            self._refusal = refusal  # answers the admission update
            # Admission is the only phase before anything exists on PVE: give back what it may have held.
            await self._uncancellable(self._release(task_id))
            self._end(Step.DONE, status_of(refusal.type), refusal.message)
            await self._uncancellable(workflow.wait_condition(workflow.all_handlers_finished))
            self._raise_if_cancelled(err)
            raise refusal from None

        self._state.vmid = vmid
        self._admission = Admission(task_id=task_id, vmid=vmid, vm_name=input.name, node=input.target)
        self._publish(Step.CLONE)
        self._vm = VmRef(task_id=task_id, node=input.target, vmid=vmid)
        clone = CloneInput(task_id, template, vmid, input.name, input.target, facts.storage)
        try:
            await self._clone_in_turn(clone, input)
            if self._cancelled and workflow.patched(CANCEL_AFTER_SLOT_PATCH):
                # Cancelled while the clone slot was being freed: that step finished, the cancellation holds.
                raise asyncio.CancelledError()
        except (Exception, asyncio.CancelledError) as err:
            await self._compensate(self._vm)
            self._end(Step.DONE, 500, MSG_CLONE_FAILED)
            self._raise_if_cancelled(err)
            raise ApplicationError(MSG_CLONE_FAILED, _reason(err), type=Failure.CLONE_FAILED.value) from None

        self._publish(Step.CONFIGURE)
        try:
            await self._configure(input, self._vm, facts)
        except (Exception, asyncio.CancelledError) as err:
            await self._compensate(self._vm)
            self._end(Step.DONE, 500, MSG_CONFIGURE_FAILED)
            self._raise_if_cancelled(err)
            raise ApplicationError(MSG_CONFIGURE_FAILED, _reason(err), type=Failure.CONFIGURE_FAILED.value) from None

        self._end(Step.DONE, 200, MSG_CREATED)
        return CreateFromBoxResult(vmid=self._vm.vmid, vm_name=input.name, node=input.target, task_id=task_id)

    # ---------------------------------------------------------------------------- phases

    async def _admit(self, input: CreateFromBoxInput, task_id: str) -> tuple[TemplateRef, TemplateFacts, int]:
        if workflow.patched(LOCAL_ADMISSION_PATCH):
            admitted = await workflow.execute_local_activity_method(
                AdmissionActivities.admit,
                AdmitInput(task_id=task_id, request=input),
                start_to_close_timeout=timedelta(seconds=30),
                schedule_to_close_timeout=self._admission_budget(PVE_BUDGET),
                retry_policy=PVE_RETRY,
            )
            template, facts, vmid = admitted.template, admitted.facts, admitted.vmid
        else:
            template, facts, vmid = await self._admit_in_three_steps(input, task_id)
        # Past the deadline the caller has answered 503 and given the request up: it must create nothing.
        self._admission_budget(timedelta(0))
        return template, facts, vmid

    async def _admit_in_three_steps(
        self, input: CreateFromBoxInput, task_id: str
    ) -> tuple[TemplateRef, TemplateFacts, int]:
        """Admission as runs started before the single admission activity did it."""
        template = await workflow.execute_local_activity_method(
            DbActivities.resolve_box,
            ResolveBoxInput(username=input.username, box_id=input.box_id),
            schedule_to_close_timeout=self._admission_budget(timedelta(seconds=30)),
            retry_policy=DB_RETRY,
        )
        facts = await workflow.execute_activity_method(
            PveActivities.inspect_template,
            InspectInput(template=template, target=input.target, storage=input.storage, disk_gb=input.disk_gb),
            start_to_close_timeout=timedelta(seconds=60),
            schedule_to_close_timeout=self._admission_budget(PVE_BUDGET),
            retry_policy=PVE_RETRY,
        )
        template = TemplateRef(node=facts.node or template.node, vmid=template.vmid)
        vmid = await workflow.execute_local_activity_method(
            DbActivities.reserve_quota,
            ReserveInput(
                task_id=task_id,
                username=input.username,
                cpu_cores=input.cpu_cores,
                memory_mb=input.memory_mb,
                disk_gb=input.disk_gb,
                free_vmids=facts.free_vmids,
                free_ranges=facts.free_ranges,
            ),
            schedule_to_close_timeout=self._admission_budget(timedelta(seconds=30)),
            retry_policy=DB_RETRY,
        )
        return template, facts, vmid

    def _admission_budget(self, default: timedelta) -> timedelta:
        """What is left of the caller's admission deadline (a REST request waits for it), else `default`.
        A run that a worker picks up only after that deadline creates nothing."""
        if self._admit_by is None:
            return default
        left = self._admit_by - workflow.now()
        if left <= timedelta(0):
            raise ApplicationError(MSG_UNAVAILABLE, type=Failure.UNAVAILABLE.value, non_retryable=True)
        return min(left, default)

    async def _configure(self, input: CreateFromBoxInput, vm: VmRef, facts: TemplateFacts) -> None:
        await workflow.execute_activity_method(
            PveActivities.configure_vm,
            ConfigureInput(
                task_id=vm.task_id,
                node=vm.node,
                vmid=vm.vmid,
                cpu_cores=input.cpu_cores,
                memory_mb=input.memory_mb,
                disk_key=facts.disk_key,
                disk_gb=input.disk_gb,
                template_disk_gb=facts.disk_gb,
            ),
            start_to_close_timeout=timedelta(minutes=3),
            heartbeat_timeout=PVE_HEARTBEAT,
            schedule_to_close_timeout=PVE_BUDGET,
            retry_policy=PVE_RETRY,
        )
        await workflow.execute_local_activity_method(
            DbActivities.commit_creation,
            FinishInput(
                task_id=vm.task_id,
                username=input.username,
                vmid=vm.vmid,
                node=vm.node,
                name=input.name,
                cpu_cores=input.cpu_cores,
                memory_mb=input.memory_mb,
                disk_gb=input.disk_gb,
            ),
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=DB_RETRY,
        )

    async def _clone_in_turn(self, req: CloneInput, input: CreateFromBoxInput) -> None:
        """Wait for a clone slot on the node and storage, clone, and free the slot whatever happens."""
        if not workflow.patched(CLONE_SLOTS_PATCH):
            # Runs that started before clone slots existed go on as they were.
            await self._clone(req, input)
            return
        slot = CloneSlotRequest(task_id=req.task_id, node=req.template.node, storage=req.storage)
        try:
            if workflow.patched(SLOT_HANDOFF_PATCH):
                await self._wait_for_clone_slot(slot)
            else:
                await self._poll_for_clone_slot(slot)
            await self._clone(req, input)
        except (Exception, asyncio.CancelledError):  # not `finally`: an evicted run must not act
            await self._release_clone_slot(req.task_id)
            raise
        await self._release_clone_slot(req.task_id)

    async def _wait_for_clone_slot(self, slot: CloneSlotRequest) -> None:
        """Take a free slot, or queue for one and sleep until the run that frees one hands it over (with a
        look every few minutes, in case that word was lost). Waiting costs nothing while it lasts."""
        self._clone_slot_granted = False
        while not await workflow.execute_local_activity_method(
            DbActivities.try_clone_slot, slot, start_to_close_timeout=timedelta(seconds=30), retry_policy=DB_RETRY
        ):
            with contextlib.suppress(asyncio.TimeoutError):
                await workflow.wait_condition(lambda: self._clone_slot_granted, timeout=SLOT_RECHECK)
            self._clone_slot_granted = False

    async def _poll_for_clone_slot(self, slot: CloneSlotRequest) -> None:
        """How runs started before the hand-over waited: a free slot at once, else activity retries."""
        free = workflow.patched(LOCAL_ADMISSION_PATCH) and await workflow.execute_local_activity_method(
            DbActivities.try_clone_slot, slot, start_to_close_timeout=timedelta(seconds=30), retry_policy=DB_RETRY
        )
        if not free:
            await workflow.execute_activity_method(
                DbActivities.acquire_clone_slot,
                slot,
                start_to_close_timeout=timedelta(seconds=30),
                schedule_to_close_timeout=CLONE_TIMEOUT,
                retry_policy=SLOT_RETRY,
            )

    @workflow.signal
    def clone_slot_granted(self) -> None:
        """Another run freed a clone slot and handed it to this one."""
        self._clone_slot_granted = True

    async def _release_clone_slot(self, task_id: str) -> None:
        """Free the slot, and tell the runs it was handed to. A run that has ended meanwhile cannot use it:
        its slot is freed in turn."""
        to_free = [task_id]
        while to_free:
            granted = await self._uncancellable(
                workflow.execute_local_activity_method(
                    DbActivities.release_clone_slot,
                    to_free.pop(),
                    start_to_close_timeout=timedelta(seconds=30),
                    retry_policy=CLEANUP_RETRY,
                )
            )
            for waiter in granted or []:  # runs older than the hand-over recorded no list here
                try:
                    await self._uncancellable(
                        workflow.get_external_workflow_handle_for(CreateFromBoxWorkflow.run, waiter).signal(
                            CreateFromBoxWorkflow.clone_slot_granted
                        )
                    )
                except Exception:
                    workflow.logger.warning("run %s has ended; freeing the clone slot it was given", waiter)
                    to_free.append(waiter)

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
            await workflow.execute_activity_method(
                PveActivities.await_task,
                PveTaskRef(upid=started.upid),
                start_to_close_timeout=timedelta(seconds=30),
                schedule_to_close_timeout=CLONE_TIMEOUT,
                retry_policy=POLL_RETRY,
            )
        else:
            await workflow.execute_activity_method(
                PveActivities.await_clone_by_lock,
                VmRef(task_id=req.task_id, node=req.target, vmid=req.vmid),
                start_to_close_timeout=timedelta(seconds=30),
                schedule_to_close_timeout=CLONE_TIMEOUT,
                retry_policy=POLL_RETRY,
            )

    async def _start_clone(self, req: CloneInput) -> CloneStarted:
        """Ask PVE for the clone. A cancellation that arrives meanwhile waits until the activity has ended: a
        request on its way may still make the VM, and a cleanup that looked before PVE had made it would leave
        it behind. (If PVE keeps failing, that includes the activity's retries, up to PVE_BUDGET.)"""
        request = asyncio.ensure_future(
            workflow.execute_activity_method(
                PveActivities.start_clone,
                req,
                start_to_close_timeout=timedelta(seconds=90),
                heartbeat_timeout=PVE_HEARTBEAT,
                schedule_to_close_timeout=PVE_BUDGET,
                retry_policy=PVE_RETRY,
            )
        )
        try:
            return await asyncio.shield(request)
        except asyncio.CancelledError:
            if not workflow.patched(CLONE_REQUEST_KEPT_PATCH):
                request.cancel()  # as runs started before this change did
                raise
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
        vmid = await workflow.execute_local_activity_method(
            DbActivities.reassign_vmid,
            ReassignInput(task_id=req.task_id, free_vmids=facts.free_vmids, free_ranges=facts.free_ranges),
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=DB_RETRY,
        )
        workflow.logger.warning("VMID %s was taken outside the service; the VM will be %s", req.vmid, vmid)
        self._vm = VmRef(task_id=req.task_id, node=req.target, vmid=vmid)
        self._state.vmid = vmid
        self._publish(Step.CLONE)
        return vmid

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

    async def _release(self, task_id: str) -> None:
        await workflow.execute_local_activity_method(
            DbActivities.release_quota,
            task_id,
            start_to_close_timeout=timedelta(seconds=30),
            retry_policy=CLEANUP_RETRY,
        )

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
        return ApplicationError(MSG_UNAVAILABLE, _reason(err), type=Failure.UNAVAILABLE.value)


def _error_type(err: ActivityError) -> str | None:
    return err.cause.type if isinstance(err.cause, ApplicationError) else None


def _reason(err: BaseException) -> str:
    """The innermost message, for operators (kept in the failure's details)."""
    while isinstance(err, ActivityError) and err.cause is not None:
        err = err.cause
    return str(err)
