"""The activities of a VM's deletion (DeleteVmWorkflow): its record in the database, and the VM on PVE. Each is
idempotent for the deletion's task id, and the PVE ones act only on a VM that carries its creation's marker
(pve.ownership), looked at again in each attempt: a VMID reused outside the service is never touched."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine
from temporalio import activity
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory

from activities.heartbeats import Heartbeats
from db import vms
from payloads import (
    MSG_DELETE_FAILED,
    MSG_VM_NOT_THE_SERVICES,
    DeletionDone,
    DeletionFailure,
    DeletionRequest,
    VmToDelete,
)
from pve.client import PveClient, PveError
from pve.ownership import is_owned_by
from pve.tasks import wait_until_done
from pve.vms import find_vm, stop_and_destroy, vm_config

# A stop and a destroy are short PVE tasks, awaited inside their activity for this long at most.
PVE_TASK_WAIT = 60.0


def _final(failure: DeletionFailure, message: str, reason: str = "") -> ApplicationError:
    return ApplicationError(message, reason, type=failure.value, non_retryable=True)


@contextmanager
def _pve_final_errors() -> Iterator[None]:
    """PVE's final answers end the deletion (500); PveUnavailable stays retryable, within the workflow's budget."""
    try:
        yield
    except PveError as exc:
        raise _final(DeletionFailure.DELETE_FAILED, MSG_DELETE_FAILED, f"PVE {exc.status}: {exc.message}") from exc


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
            found = self._own_vm(vm)
            if found is None or found.get("status") != "running":
                return
            upid = self.pve.post(f"nodes/{found['node']}/qemu/{vm.vmid}/status/stop")
            if upid:
                wait_until_done(self.pve, str(upid), PVE_TASK_WAIT)

    @activity.defn
    def destroy_for_deletion(self, vm: VmToDelete) -> None:
        """Destroy the VM with its disks, also those its config no longer names. Gone already: done."""
        with self._heartbeats.during(), _pve_final_errors():
            found = self._own_vm(vm)
            if found is None:
                return
            # Started again since the stop step (by a person, or by a power action): stopped first, again.
            running = found.get("status") == "running"
            stop_and_destroy(self.pve, found["node"], vm.vmid, running=running, limit=PVE_TASK_WAIT)

    def _own_vm(self, vm: VmToDelete) -> dict[str, Any] | None:
        """The VM as /cluster/resources shows it (its node may have changed since the record was written), or
        None if the VMID holds nothing. A guest there without the creation's marker (a container, a VM made
        outside the service, a description edited by hand) is final: the service cannot tell a reused VMID
        from a marker erased to escape the plan, so it touches nothing and frees nothing."""
        found = find_vm(self.pve, vm.vmid)
        if found is None:
            return None
        config = vm_config(self.pve, found["node"], vm.vmid) if found.get("type") == "qemu" else {}
        if config is None:
            return None  # destroyed between the two reads
        if not is_owned_by(config.get("description"), vm.creation_task_id):
            raise _final(
                DeletionFailure.NOT_THE_SERVICES,
                MSG_VM_NOT_THE_SERVICES,
                f"VM {vm.vmid} on node {found['node']} lacks the marker of task {vm.creation_task_id}",
            )
        return found
