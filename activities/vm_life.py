"""The activities of a VM's deletion (DeleteVmWorkflow) and of its power actions (PowerVmWorkflow): its record
in the database, and the VM on PVE. Each is idempotent for its task id, and the PVE ones act only on a VM that
carries its creation's marker (pve.ownership), looked at again in each attempt: a VMID reused outside the
service is never touched."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from typing import Any

from sqlalchemy import Engine
from temporalio import activity
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory

from activities.heartbeats import Heartbeats
from db import vms
from payloads import (
    MSG_DELETE_FAILED,
    MSG_POWER_FAILED,
    MSG_VM_BEING_DELETED,
    MSG_VM_NOT_FOUND,
    MSG_VM_NOT_RUNNING,
    MSG_VM_NOT_THE_SERVICES,
    DeletionDone,
    DeletionFailure,
    DeletionRequest,
    PowerAction,
    PowerFailure,
    PowerVmInput,
    PowerVmResult,
    VmToDelete,
)
from pve.client import PveClient, PveError
from pve.ownership import is_owned_by
from pve.tasks import PveTaskFailed, task_done, wait_until_done
from pve.vms import find_vm, stop_and_destroy, vm_config

# A stop, a destroy and a power action are short PVE tasks, awaited inside their activity for this long at most
# (a shutdown still going on then is awaited again by the next attempt).
PVE_TASK_WAIT = 60.0
# PVE's task type of each power action: a retry finds the task an earlier attempt started by it.
POWER_TASK_TYPES = {
    PowerAction.START: "qmstart",
    PowerAction.SHUTDOWN: "qmshutdown",
    PowerAction.STOP: "qmstop",
    PowerAction.REBOOT: "qmreboot",
}


def _final(failure: StrEnum, message: str, reason: str = "") -> ApplicationError:
    return ApplicationError(message, reason, type=failure.value, non_retryable=True)


@contextmanager
def _pve_final_errors(
    failure: StrEnum = DeletionFailure.DELETE_FAILED, message: str = MSG_DELETE_FAILED
) -> Iterator[None]:
    """PVE's final answers end the deletion (or power action) with a 500; PveUnavailable stays retryable, within
    the workflow's budget."""
    try:
        yield
    except PveError as exc:
        raise _final(failure, message, f"PVE {exc.status}: {exc.message}") from exc


class VmLifeActivities:
    def __init__(self, pve: PveClient, engine: Engine):
        self.pve = pve
        self.engine = engine
        self._heartbeats = Heartbeats()

    # ------------------------------------------------------------------------------ the record

    @activity.defn
    def begin_deletion(self, req: DeletionRequest) -> VmToDelete:
        """The owner's VM the deletion is for, now marked as being deleted by it."""
        try:
            vm = vms.begin_deletion(self.engine, req.username, req.vmid, req.task_id)
        except vms.NotDeletable as exc:
            failure = DeletionFailure.VM_NOT_FOUND if exc.status == 404 else DeletionFailure.BEING_CREATED
            raise ApplicationError(
                exc.message,
                type=failure.value,
                non_retryable=True,
                category=ApplicationErrorCategory.BENIGN,  # an answer, not a fault of the worker
            ) from exc
        return VmToDelete(creation_task_id=vm.task_id, vmid=vm.vmid, node=vm.node, vm_name=vm.name, done=vm.deleted)

    @activity.defn
    def finish_deletion(self, req: DeletionDone) -> None:
        """Give the VM's resources back to its owner's plan: its record is deleted."""
        vms.finish_deletion(self.engine, req.creation_task_id)

    @activity.defn
    def abandon_deletion(self, req: DeletionDone) -> None:
        vms.abandon_deletion(self.engine, req.creation_task_id, req.task_id)

    # ---------------------------------------------------------------------------------- PVE

    @activity.defn
    def stop_for_deletion(self, vm: VmToDelete) -> None:
        """Stop the VM at once (no shutdown: it is being thrown away). Stopped or gone already: nothing to do."""
        with self._heartbeats.during(), _pve_final_errors():
            found = self._own_vm(vm.vmid, vm.creation_task_id)
            if found is None or found.get("status") != "running":
                return
            upid = self.pve.post(f"nodes/{found['node']}/qemu/{vm.vmid}/status/stop")
            if upid:
                wait_until_done(self.pve, str(upid), PVE_TASK_WAIT)

    @activity.defn
    def destroy_for_deletion(self, vm: VmToDelete) -> None:
        """Destroy the VM with its disks, also those its config no longer names. Gone already: done."""
        with self._heartbeats.during(), _pve_final_errors():
            found = self._own_vm(vm.vmid, vm.creation_task_id)
            if found is None:
                return
            # Started again since the stop step (by a person, or by a power action): stopped first, again.
            running = found.get("status") == "running"
            stop_and_destroy(self.pve, found["node"], vm.vmid, running=running, limit=PVE_TASK_WAIT)

    def _own_vm(self, vmid: int, creation_task_id: str) -> dict[str, Any] | None:
        """The VM as /cluster/resources shows it (its node may have changed since the record was written), or
        None if the VMID holds nothing. A guest there without the creation's marker (a container, a VM made
        outside the service, a description edited by hand) is final: the service cannot tell a reused VMID
        from a marker erased to escape the plan, so it touches nothing and frees nothing."""
        found = find_vm(self.pve, vmid)
        if found is None:
            return None
        config = vm_config(self.pve, found["node"], vmid) if found.get("type") == "qemu" else {}
        if config is None:
            return None  # destroyed between the two reads
        if not is_owned_by(config.get("description"), creation_task_id):
            raise _final(
                DeletionFailure.NOT_THE_SERVICES,
                MSG_VM_NOT_THE_SERVICES,
                f"VM {vmid} on node {found['node']} lacks the marker of task {creation_task_id}",
            )
        return found

    # ----------------------------------------------------------------------------- power

    @activity.defn
    def power_vm(self, req: PowerVmInput) -> PowerVmResult:
        """Start, shut down, stop or reboot the owner's VM, and await PVE's task. Idempotent for the run: a VM
        already in the state asked for (running, or stopped) needs nothing, and a retry awaits the task an earlier
        attempt started rather than ask for a second one (a reboot twice)."""
        action = PowerAction(req.action)
        with self._heartbeats.during(), _pve_final_errors(PowerFailure.POWER_FAILED, MSG_POWER_FAILED):
            record = self._powerable(req)
            found = self._own_vm(req.vmid, record.task_id)
            if found is None:
                raise _final(PowerFailure.VM_NOT_FOUND, MSG_VM_NOT_FOUND, f"VMID {req.vmid} holds no VM on PVE")
            node = str(found["node"])
            upid = self._earlier_task(node, req.vmid, action) if activity.info().attempt > 1 else None
            if upid is None:
                upid = self._ask(found, req.vmid, action)
            if upid is not None:
                wait_until_done(self.pve, upid, PVE_TASK_WAIT)
            return PowerVmResult(vmid=req.vmid, action=action.value, node=node, vm_name=record.name)

    def _powerable(self, req: PowerVmInput) -> vms.VmRecord:
        """The owner's VM record, neither being created nor being deleted (a deletion owns the VM from its start:
        a start now would only make its stop step do its work again)."""
        try:
            record = vms.deletable(self.engine, req.username, req.vmid)
        except vms.NotDeletable as exc:
            failure = PowerFailure.VM_NOT_FOUND if exc.status == 404 else PowerFailure.BEING_CREATED
            raise _final(failure, exc.message) from exc
        if record.deleting:
            raise _final(PowerFailure.BEING_DELETED, MSG_VM_BEING_DELETED)
        return record

    def _ask(self, found: dict[str, Any], vmid: int, action: PowerAction) -> str | None:
        """Ask PVE for the action, unless the VM is already where it would take it; the UPID of PVE's task."""
        running = found.get("status") == "running"
        if action is PowerAction.REBOOT:
            if not running:
                raise _final(PowerFailure.NOT_RUNNING, MSG_VM_NOT_RUNNING, f"VM {vmid} is {found.get('status')}")
        elif running == (action is PowerAction.START):
            return None  # started already, or stopped already
        upid = self.pve.post(f"nodes/{found['node']}/qemu/{vmid}/status/{action.value}")
        return str(upid) if upid else None

    def _earlier_task(self, node: str, vmid: int, action: PowerAction) -> str | None:
        """The UPID of a task of this action on the VM started since this activity was first scheduled, running
        or ended well: an earlier attempt's whose answer was lost (or the same asked by someone else
        meanwhile, which does as well). One that failed is no reason not to ask again. PVE counts in whole
        seconds on its own clock: a task asked for by another run in the same second may be taken for this
        one's, a narrow window that only a retry opens."""
        since = int(activity.info().scheduled_time.timestamp())
        kind = POWER_TASK_TYPES[action]
        for task in self.pve.get(f"nodes/{node}/tasks", vmid=vmid, typefilter=kind, since=since, source="all"):
            if task.get("type") != kind or int(task.get("starttime") or 0) < since:
                continue
            try:
                task_done(self.pve, str(task["upid"]))
            except PveTaskFailed:
                continue
            return str(task["upid"])
        return None
