"""Everything that crosses the Temporal boundary: workflow, update and activity inputs and results.

No `from __future__ import annotations` here: the payload converter resolves these type hints, also inside
other teams' workflow sandboxes, and string annotations fail there.

Plain dataclasses with defaults on every field added later, so that old histories still decode.
No side effects and no heavy imports: workflow code imports this module.
"""

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from payloads_lab import *  # noqa: F403  (a lab's payloads, kept apart for the module's size)
from payloads_lab import LabVm
from payloads_life import *  # noqa: F403  (deletion and power payloads, kept apart for the module's size)
from pve.ownership import OWNER_MARK as OWNER_MARK  # re-exported for tests/test_chaos.py

# --------------------------------------------------------------------- the seed's messages

MSG_CREATED = "VM created and configured successfully"
MSG_INVALID_NAME = (
    "Invalid VM name. Name must contain only alphanumeric characters, hyphens, and dots, "
    "and each dot-separated label must start and end with an alphanumeric character"
)
MSG_PER_VM_LIMIT = "Requested resources exceed the per VM limits of your compute resource plan"
MSG_TOTAL_LIMIT = "Requested resources exceed the available limits of your compute resource plan"
MSG_FORBIDDEN = "You do not have permission to use this template"
MSG_BOX_NOT_FOUND = "Box not found"
MSG_TEMPLATE_NOT_FOUND = "Template not found"
MSG_PLAN_NOT_FOUND = "Compute resource plan not found"
MSG_CLONE_FAILED = "Failed to clone VM from template"
MSG_CONFIGURE_FAILED = "VM created but configuration failed, resources have been cleaned up"
MSG_UNAVAILABLE = "Service unavailable: the request could not be admitted in time, nothing was created"
# A PVE-side condition that may clear by itself (storage inactive, node offline, no quorum): "<this>: <cause>".
MSG_PVE_NOT_READY = "Service unavailable"


class Failure(StrEnum):
    """ApplicationError types the workflow and activities raise, and the HTTP status each one answers."""

    INVALID_REQUEST = "InvalidRequest"
    FORBIDDEN = "Forbidden"
    BOX_NOT_FOUND = "BoxNotFound"
    TEMPLATE_NOT_FOUND = "TemplateNotFound"
    PLAN_NOT_FOUND = "PlanNotFound"
    PER_VM_LIMIT = "PerVmLimitExceeded"
    TOTAL_LIMIT = "TotalLimitExceeded"
    UNAVAILABLE = "Unavailable"
    # PVE cannot take the clone now, for a reason that may clear by itself: the client asks again later.
    PVE_NOT_READY = "PveNotReady"
    CLONE_FAILED = "CloneFailed"
    CONFIGURE_FAILED = "ConfigureFailed"

    @property
    def status(self) -> int:
        return _STATUS[self]


_STATUS = {
    Failure.INVALID_REQUEST: 400,
    Failure.PER_VM_LIMIT: 400,
    Failure.TOTAL_LIMIT: 400,
    Failure.FORBIDDEN: 403,
    Failure.BOX_NOT_FOUND: 404,
    Failure.TEMPLATE_NOT_FOUND: 404,
    Failure.PLAN_NOT_FOUND: 404,
    Failure.CLONE_FAILED: 500,
    Failure.CONFIGURE_FAILED: 500,
    Failure.UNAVAILABLE: 503,
    Failure.PVE_NOT_READY: 503,
}


def status_of(error_type: str | None) -> int:
    """HTTP status for an ApplicationError type; anything unexpected is a 500."""
    try:
        return Failure(error_type or "").status
    except ValueError:
        return 500


# start_clone found a VM it did not make under the task's VMID (made outside the service): pick another.
VMID_TAKEN = "VmidTaken"

# A step after the clone found the task's VMID gone, or held by a VM without the task's marker (ours vanished,
# and another creation, or a person, took the VMID): final, the run fails and its cleanup leaves that VM alone.
VM_NOT_OURS = "VmNotOurs"

# ApplicationError types of a PVE task that ended in error: final, or worth starting the step again.
PVE_TASK_FAILED = "PveTaskFailed"
PVE_TASK_FAILED_TRANSIENT = "PveTaskFailedTransient"

# The ApplicationError types no retry of the step can change (the activities' retry policies stop at them).
FINAL_FAILURES = [f.value for f in Failure] + [PVE_TASK_FAILED, PVE_TASK_FAILED_TRANSIENT, VMID_TAKEN, VM_NOT_OURS]

# The tag configure gives the service's VMs: a label for people. Ownership is the marker (pve.ownership).
SERVICE_TAG = "pve-boxes"


# ------------------------------------------------------------------------------ workflow


@dataclass
class CreateFromBoxInput:
    username: str  # whose plan and template permissions apply
    box_id: str
    name: str
    target: str
    cpu_cores: int
    memory_mb: int
    disk_gb: int
    storage: str | None = None  # None: DEFAULT_STORAGE
    ssh_keys: list[str] = field(default_factory=list)  # the request's sshKeys, added to the box's cloud-init
    start: bool | None = None  # the request's start; None: the box's
    # Set by the REST API: past this instant the run gives up admission and creates nothing. Last: the fields
    # before it are the contract's, in its order, for a parent workflow that passes them by position.
    admit_by: datetime | None = None


@dataclass
class CreateFromBoxResult:
    vmid: int
    vm_name: str
    node: str
    task_id: str = ""


@dataclass
class Admission:
    """What the POST answers once the request is admitted: the VMID the new VM will have."""

    task_id: str
    vmid: int
    vm_name: str
    node: str


class Step(StrEnum):
    ADMISSION = "admission"
    CLONE = "clone"
    CONFIGURE = "configure"
    START = "start"  # the VM is started, then its address awaited (a box's or the request's `start`)
    CLEANUP = "cleanup"
    DONE = "done"


@dataclass
class TaskState:
    """The run's state as GET /tasks/{task_id} shows it; the workflow keeps it in its memo, and `step` and
    `vmid` also in BoxStep and VmId, which a creation moves alone between its first and last steps."""

    owner: str
    step: str = Step.ADMISSION.value
    vmid: int | None = None
    vm_name: str = ""
    node: str = ""
    result_code: int | None = None
    result_message: str | None = None
    kind: str = "create"  # the task's workflow (TaskKind)
    # A creation's: what the guest agent reported (IPv4 first, loopback and link-local left out).
    ip_addresses: list[str] = field(default_factory=list)
    vms: list[LabVm] = field(default_factory=list)  # a lab's VMs and their states


class TaskKind(StrEnum):
    CREATE = "create"
    DELETE = "delete"
    POWER = "power"
    LAB = "lab"


# ------------------------------------------------------------------------------ a box's options


@dataclass
class CloudInit:
    user: str | None = None
    ssh_keys: list[str] = field(default_factory=list)
    ipconfig0: str | None = None  # PVE's format: ip=dhcp, ip=CIDR,gw=IP, ip6=...
    nameserver: str | None = None


@dataclass
class Network:
    bridge: str | None = None
    vlan: int | None = None


@dataclass
class BoxOptions:
    """What makes the box's VMs ready to use (boxctl load); the defaults: a box that names none."""

    start: bool = False
    wait_for_ip_seconds: int = 0
    cloud_init: CloudInit | None = None
    pool: str | None = None
    tags: list[str] = field(default_factory=list)
    network: Network | None = None


# ---------------------------------------------------------------------------- activities


@dataclass
class AdmitInput:
    task_id: str
    request: CreateFromBoxInput


@dataclass
class TemplateRef:
    node: str
    vmid: int


@dataclass
class InspectInput:
    template: TemplateRef
    target: str
    storage: str | None  # None: the worker's DEFAULT_STORAGE
    disk_gb: int


@dataclass
class TemplateFacts:
    disk_key: str  # the boot disk, e.g. scsi0
    disk_gb: int  # its size on the template
    node: str  # where PVE has the template now
    storage: str  # the storage the clone goes to
    # VMIDs PVE shows as free, as inclusive [first, last] ranges, lowest first: the reservation claims the
    # lowest one that no other live creation holds.
    free_ranges: list[list[int]]


@dataclass
class Admitted:
    template: TemplateRef  # where PVE has the template now
    facts: TemplateFacts
    vmid: int
    box: BoxOptions = field(default_factory=BoxOptions)  # the box's options, read at admission
    # The clone slot, asked for at once: 0 if the run holds one, N if it is Nth in line; None (histories from
    # before it was asked at admission): the run asks for it itself.
    clone_slot: int | None = None
    # True from this version of admission on: the run then moves only BoxStep and VmId between its first step
    # and its last, and writes its memo again only as it ends (CreateFromBoxWorkflow._publish). False in runs
    # admitted by an earlier worker, which keep publishing everything at each step: their histories (and a run
    # begun by an older worker during a rolling upgrade) replay as they were recorded.
    changes_only: bool = False
    # True from this version of admission on: the run asks the clone's activity to free the clone slot once the
    # clone has ended well, and the configuration's to record the VM when that is the last step
    # (activities/creation.py), each saving the run a local activity and a workflow task's round (figure 4 of
    # `make bench`). False in runs admitted by an earlier worker, which free and record in local activities of
    # their own and replay as they were recorded.
    steps_merged: bool = False
    # True from this version of admission on: the clone's activity, once the clone has ended well, also configures
    # the VM, saving the run an activity and a workflow task's round (figure 4 of `make bench`); the run's own
    # configuration step follows only if that did not succeed (CloneStarted.configured); if none follows, the record
    # is a local activity of the run's. False in runs admitted by an earlier worker: they replay as they were recorded.
    configure_with_clone: bool = False


@dataclass
class ReassignInput:
    task_id: str
    free_ranges: list[list[int]]  # as TemplateFacts.free_ranges


@dataclass
class CloneSlotRequest:
    task_id: str
    node: str  # the node whose PVE worker runs the clone (the template's)
    storage: str  # the storage the clone writes to
    owner: str = ""  # whose creation: turns are fair between owners ("" in runs started before it was sent)


@dataclass
class CloneStarted:
    upid: str | None  # None: the VM was already there, made by an earlier attempt of this task
    finished: bool = False  # the clone already ended well while the activity watched it
    slot_freed: bool = False  # and the activity freed the clone slot (CreationActivities.start_clone)
    # and it configured the VM as CloneInput.configure asked; if not, the run's own configuration step does
    # (CreationActivities.start_clone)
    configured: bool = False
    # or it met a final error there (FINAL_FAILURES), which the run's configuration step fails with at once
    configure_failure: str | None = None


@dataclass
class PveTaskRef:
    upid: str


@dataclass
class VmRef:
    task_id: str
    node: str
    vmid: int


@dataclass
class FinishInput:
    task_id: str
    username: str
    vmid: int
    node: str
    name: str
    cpu_cores: int
    memory_mb: int
    disk_gb: int
    box_id: str | None = None  # what GET vms shows; None in histories from before it was kept
    storage: str | None = None
    ip_addresses: list[str] = field(default_factory=list)


@dataclass
class ConfigureInput:
    task_id: str
    node: str
    vmid: int
    cpu_cores: int
    memory_mb: int
    disk_key: str
    disk_gb: int
    template_disk_gb: int
    box: BoxOptions = field(default_factory=BoxOptions)  # its cloud-init, tags and network are written
    ssh_keys: list[str] = field(default_factory=list)  # the request's, beside the box's
    storage: str | None = None  # where a cloud-init drive goes (the clone's storage)
    # Record the VM in the same activity once it is configured (Admitted.steps_merged, when nothing follows the
    # configuration); the activity answers True. A worker of an earlier version ignores it and answers None.
    record: FinishInput | None = None


@dataclass
class CloneInput:
    task_id: str
    template: TemplateRef
    vmid: int
    name: str
    target: str
    storage: str
    pool: str | None = None  # the PVE pool the new VM joins (the box's)
    # Free the clone slot in the same activity once the clone has ended well (Admitted.steps_merged); a worker
    # of an earlier version ignores it, and CloneStarted.slot_freed then says no.
    free_slot: bool = False
    # Configure the VM in the same activity once the clone has ended well (Admitted.configure_with_clone); a
    # worker of an earlier version ignores it, and CloneStarted.configured then says no.
    configure: ConfigureInput | None = None


@dataclass
class AddressWatch:
    """Wait up to `seconds` (counted from the first attempt) for the guest agent to report an address."""

    vm: VmRef
    seconds: int
