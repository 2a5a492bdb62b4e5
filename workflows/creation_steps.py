"""CreateFromBoxWorkflow's steps after admission: the inputs of the clone, configure and record steps, built from
the request and its admission, and the `start` step: start the VM, then wait for the guest agent to report its
address. A start that fails fails the step (the creation is then cleaned up); an address that does not come in
time is no failure: the VM is made, and its task shows no address."""

from __future__ import annotations

from collections.abc import Awaitable
from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError, is_cancelled_exception

with workflow.unsafe.imports_passed_through():
    from activities.creation import CreationActivities
    from activities.db import DbActivities
    from activities.pve import PveActivities
    from payloads import (
        AddressWatch,
        Admitted,
        CloneInput,
        CloneStarted,
        ConfigureInput,
        CreateFromBoxInput,
        FinishInput,
        InspectInput,
        TemplateFacts,
        VmRef,
    )
    from workflows.policies import (
        CLEANUP_RETRY,
        DB_TIMEOUT,
        PVE_BUDGET,
        PVE_HEARTBEAT,
        PVE_RETRY,
        RECORD_RETRY,
        db_step,
        innermost_reason,
        pve_change,
    )

# Ask for the clone and watch it for a few seconds (activities/pve.py's CLONE_INLINE_WAIT), then free its slot.
CLONE_REQUEST_TIMEOUT = timedelta(seconds=90)
# Cores, memory and the options in one write, then the disk's resize (a PVE task).
CONFIGURE_TIMEOUT = timedelta(minutes=3)
# A start is one short PVE task; PVE's own start timeout is 30 s for most guests.
START_TIMEOUT = timedelta(minutes=2)
# Beyond the wait itself: the activity's last look at the agent, and room for a worker's death and a retry.
ADDRESS_MARGIN = timedelta(seconds=60)


def clone_input(vm: VmRef, input: CreateFromBoxInput, admitted: Admitted, free_slot: bool) -> CloneInput:
    """The clone's input; admitted to configure with the clone, that configuration's input too. Never the record:
    a cancellation that comes during the clone undoes the creation, and the VM must not be its owner's by then
    (the record is a step of the run's own, uncancellable, see CreateFromBoxWorkflow._record)."""
    template, storage = admitted.template, admitted.facts.storage
    configure = configure_input(vm, input, admitted, record=False) if admitted.configure_with_clone else None
    return CloneInput(
        vm.task_id,
        template,
        vm.vmid,
        input.name,
        vm.node,
        storage,
        pool=admitted.box.pool,
        free_slot=free_slot,
        configure=configure,
    )


def move_to_vmid(req: CloneInput, vmid: int) -> None:
    """The clone (and the configuration it carries) to VMID `vmid`, another than admission's."""
    req.vmid = vmid
    if req.configure is not None:
        req.configure.vmid = vmid


def configure_input(vm: VmRef, input: CreateFromBoxInput, admitted: Admitted, record: bool) -> ConfigureInput:
    """The configuration's input; with `record`, the VM's record too (the configuration is the last step)."""
    return ConfigureInput(
        task_id=vm.task_id,
        node=vm.node,
        vmid=vm.vmid,
        cpu_cores=input.cpu_cores,
        memory_mb=input.memory_mb,
        disk_key=admitted.facts.disk_key,
        disk_gb=input.disk_gb,
        template_disk_gb=admitted.facts.disk_gb,
        box=admitted.box,
        ssh_keys=input.ssh_keys,
        storage=admitted.facts.storage,
        record=finish_input(vm, input, admitted, []) if record else None,
    )


def finish_input(vm: VmRef, input: CreateFromBoxInput, admitted: Admitted, ip_addresses: list[str]) -> FinishInput:
    return FinishInput(
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
        ip_addresses=ip_addresses,
    )


def start_clone(req: CloneInput) -> Awaitable[CloneStarted]:
    """Ask PVE for the clone and watch it for a moment; a clone that ended well meanwhile then also frees its
    clone slot (`req.free_slot`) and configures the VM (`req.configure`) in the same activity (CloneStarted)."""
    if req.configure is None:
        return pve_change(CreationActivities.start_clone, req, CLONE_REQUEST_TIMEOUT, f"clone VM {req.vmid}")
    summary = f"clone and configure VM {req.vmid}"
    # The configuration's own time on top (the activity configures only with that much left: CONFIGURE_SECONDS).
    return pve_change(CreationActivities.start_clone, req, CLONE_REQUEST_TIMEOUT + CONFIGURE_TIMEOUT, summary)


def record(done: FinishInput) -> Awaitable[None]:
    """The VM's record, the creation's last step: it rides over a database away for minutes (RECORD_RETRY)."""
    return db_step(DbActivities.commit_creation, done, RECORD_RETRY, f"record VM {done.vmid}")


def give_back_quota(task_id: str, failed: bool) -> Awaitable[None]:
    """The creation's undo of its quota (or record). `failed`, not cancelled: a lab VM's first try then hands its
    quota over to its retry (quota.undo_creation); no retry follows a cancellation, so that gives it back."""
    return workflow.execute_local_activity_method(
        DbActivities.release_quota,
        args=[task_id, failed],
        start_to_close_timeout=DB_TIMEOUT,
        retry_policy=CLEANUP_RETRY,
        summary="give the quota back",
    )


def free_vmids(req: CloneInput, disk_gb: int) -> Awaitable[TemplateFacts]:
    """PVE's view again, for the VMIDs free now (the admission's VMID was taken outside the service)."""
    return workflow.execute_activity_method(
        PveActivities.inspect_template,
        InspectInput(template=req.template, target=req.target, storage=req.storage, disk_gb=disk_gb),
        start_to_close_timeout=timedelta(seconds=60),
        schedule_to_close_timeout=PVE_BUDGET,
        retry_policy=PVE_RETRY,
        summary=f"VMID {req.vmid} taken outside the service: free VMIDs",
    )


def configure(req: ConfigureInput) -> Awaitable[bool | None]:
    """Configure the VM; with `req.record`, record it in the same activity (True: recorded; None: the worker did
    not, being of an earlier version). Cancellable: the activity records nothing once the run has undone the
    creation.

    configure_vm writes to the VM only while it carries this task's marker. The record that follows (here or in a
    step of its own) asks PVE nothing more: it touches only the database, and a VM that vanishes after configure
    is the same as one deleted by hand after success (the repair tool marks it deleted; anything under its VMID
    without the marker is reported, and neither a deletion nor the repair tool acts on it)."""
    what = "configure and record" if req.record is not None else "configure"
    return pve_change(CreationActivities.configure_vm, req, CONFIGURE_TIMEOUT, f"{what} VM {req.vmid}")


async def start_and_address(vm: VmRef, wait_seconds: int) -> list[str]:
    """Start `vm` (this task's: the activity checks its marker), then, with `wait_seconds` > 0, the addresses the
    guest agent reports within that time (empty if none came)."""
    workflow.set_current_details(f"starting VM {vm.vmid}")
    await pve_change(PveActivities.start_vm, vm, START_TIMEOUT, f"start VM {vm.vmid}")
    if wait_seconds <= 0:
        return []
    workflow.set_current_details(f"VM {vm.vmid} started: waiting up to {wait_seconds} s for its address")
    wait = timedelta(seconds=wait_seconds)
    try:
        return await workflow.execute_activity_method(
            PveActivities.vm_addresses,
            AddressWatch(vm=vm, seconds=wait_seconds),
            # The activity counts the wait from its first attempt: a retry after a worker's death waits the rest.
            start_to_close_timeout=wait + ADDRESS_MARGIN,
            schedule_to_close_timeout=wait + PVE_BUDGET,
            heartbeat_timeout=PVE_HEARTBEAT,
            retry_policy=PVE_RETRY,
            summary=f"wait up to {wait_seconds} s for the address of VM {vm.vmid}",
        )
    except ActivityError as err:
        if is_cancelled_exception(err):
            raise
        workflow.logger.warning("VM %s: no address from its guest agent: %s", vm.vmid, innermost_reason(err))
        return []


def undone(vmid: int, destroyed: bool | None) -> str:
    """What a failed run's cleanup did with its VM, for its current details."""
    if destroyed is None:  # a history from before destroy_vm said
        return f"VM {vmid} destroyed if it was made"
    return f"VM {vmid} destroyed" if destroyed else f"no VM {vmid} of this task's was there to destroy"
