"""The payloads of a VM's life after its creation: its deletion and its power actions.

Re-exported by payloads (import them from there); the same rules as payloads': no
`from __future__ import annotations`, defaults on every field added later, no side effects.
"""

from dataclasses import dataclass
from enum import StrEnum

# ------------------------------------------------------------------------------ a VM's deletion

MSG_DELETION_STARTED = "VM deletion started"
MSG_DELETED = "VM deleted successfully"
MSG_DELETE_FAILED = "Failed to delete VM"
MSG_VM_NOT_FOUND = "VM not found"
MSG_VM_BEING_CREATED = "VM is still being created"
MSG_VM_NOT_THE_SERVICES = "VM on PVE is not the one this service created"


class DeleteStep(StrEnum):
    STOP = "stop"
    DESTROY = "destroy"
    DONE = "done"


class DeletionFailure(StrEnum):
    """ApplicationError types a deletion fails with, and the result_code each one ends with."""

    VM_NOT_FOUND = "VmNotFound"  # not (or no longer) one of the owner's VMs
    BEING_CREATED = "VmBeingCreated"  # its creation still runs
    # The VMID holds a VM without the creation's marker: never touched, nothing freed.
    NOT_THE_SERVICES = "VmNotTheServices"
    DELETE_FAILED = "DeleteFailed"

    @property
    def status(self) -> int:
        return _DELETION_STATUS.get(self, 500)


_DELETION_STATUS = {
    DeletionFailure.VM_NOT_FOUND: 404,
    DeletionFailure.BEING_CREATED: 409,
    DeletionFailure.NOT_THE_SERVICES: 409,
}


@dataclass
class DeleteVmInput:
    username: str  # the VM's owner
    vmid: int


@dataclass
class DeleteVmResult:
    vmid: int
    vm_name: str
    node: str
    task_id: str = ""


@dataclass
class DeletionRequest:
    task_id: str  # the deletion's
    username: str
    vmid: int


@dataclass
class VmToDelete:
    """The VM record a deletion acts on. `done`: this deletion had already marked it deleted (a repeat of a
    run that succeeded), so PVE is not looked at again: its VMID may be someone else's by now."""

    creation_task_id: str  # the task whose marker the VM on PVE must carry
    vmid: int
    node: str
    vm_name: str
    done: bool = False


@dataclass
class DeletionDone:
    task_id: str  # the deletion's
    creation_task_id: str


# ------------------------------------------------------------------------------ a VM's power

MSG_POWER_STARTED = "Power action started"
MSG_POWER_DONE = "Power action done"
MSG_POWER_FAILED = "Power action failed"
MSG_VM_BEING_DELETED = "VM is being deleted"
MSG_VM_NOT_RUNNING = "VM is not running"  # a reboot of a stopped VM


class PowerAction(StrEnum):
    START = "start"
    SHUTDOWN = "shutdown"  # asks the guest (ACPI) to power off
    STOP = "stop"  # pulls the plug
    REBOOT = "reboot"


class PowerStep(StrEnum):
    POWER = "power"
    DONE = "done"


class PowerFailure(StrEnum):
    """ApplicationError types a power action fails with (the first three as the deletion's), and its result_code."""

    VM_NOT_FOUND = "VmNotFound"
    BEING_CREATED = "VmBeingCreated"
    NOT_THE_SERVICES = "VmNotTheServices"
    BEING_DELETED = "VmBeingDeleted"
    NOT_RUNNING = "VmNotRunning"
    POWER_FAILED = "PowerFailed"

    @property
    def status(self) -> int:
        return {PowerFailure.VM_NOT_FOUND: 404, PowerFailure.POWER_FAILED: 500}.get(self, 409)


@dataclass
class PowerVmInput:
    username: str  # the VM's owner
    vmid: int
    action: str  # a PowerAction


@dataclass
class PowerVmResult:
    vmid: int
    action: str
    node: str
    vm_name: str = ""
    task_id: str = ""
