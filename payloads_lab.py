"""The payloads of a lab: `count` VMs from one box in one request (LabWorkflow, POST labs).

Re-exported by payloads (import them from there); the same rules as payloads': no
`from __future__ import annotations`, defaults on every field added later, no side effects.
"""

import re
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

MSG_LAB_STARTED = "Lab creation started"
MSG_LAB_DELETION_STARTED = "Lab deletion started"
MSG_LAB_BEING_CREATED = "Lab is still being created"
# At most this many VMs in one lab (the contract's `count`: 1..100).
MAX_LAB_VMS = 100


def lab_result_message(made: int, count: int) -> str:
    """How a lab ends: `Created 12 of 12 VMs` (succeeded) or `Created 9 of 12 VMs` (failed, the 9 kept)."""
    return f"Created {made} of {count} VMs"


def lab_vm_names(name: str, count: int) -> list[str]:
    """<name>-01 .. <name>-NN: two digits, three for every VM when there are 100 of them."""
    width = 3 if count >= 100 else 2
    return [f"{name}-{number:0{width}d}" for number in range(1, count + 1)]


def lab_vm_memo_key(index: int) -> str:
    """The memo key under which a lab keeps the state of its VM number `index` (0-based): `vm000`, `vm001`, ...
    (each on its own, so that a change of one VM rewrites only its key)."""
    return f"vm{index:03d}"


LAB_VM_MEMO_KEY = re.compile(r"vm\d{3}")


class LabStep(StrEnum):
    ADMISSION = "admission"
    VMS = "vms"  # the creations run, one child workflow each
    DONE = "done"


class LabVmStatus(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass
class LabInput:
    """LabWorkflow's input: another workflow runs it as a child with `from workflows import LabWorkflow,
    LabInput`."""

    username: str
    box_id: str
    name: str  # the VMs are named <name>-01 .. <name>-NN
    count: int
    cpu_cores: int
    memory_mb: int
    disk_gb: int
    targets: list[str] | None = None  # None: every online node
    storage: str | None = None  # None: DEFAULT_STORAGE
    ssh_keys: list[str] = field(default_factory=list)
    start: bool | None = None  # None: the box's
    # Set by the REST API: past this instant the run gives up admission and creates nothing.
    admit_by: datetime | None = None


@dataclass
class LabVm:
    """One VM of a lab: its creation's task, and where it is (to be). A retried creation has a new task id and
    perhaps another node and VMID (None until its run has fixed it)."""

    vm_name: str
    vmid: int | None
    node: str
    task_id: str
    status: str = LabVmStatus.RUNNING.value


@dataclass
class LabAdmitInput:
    task_id: str
    request: LabInput


@dataclass
class LabAdmitted:
    """The lab's VMs as admission placed them: names, VMIDs and nodes fixed, each one's quota held under its
    creation's task id."""

    vms: list[LabVm]
    targets: list[str]  # the nodes the lab may use (a retry goes to another one of them)


@dataclass
class LabAdmission:
    """What POST labs answers once the lab is admitted."""

    task_id: str
    vms: list[LabVm]


@dataclass
class LabResult:
    vms: list[LabVm]
    made: int


@dataclass
class EarlierCreation:
    """In a lab an operator reset, what became of a VM's creations (its first try's and its retry's) that the lab
    had begun before: one still running (its task id), else the VM one of them made (its record), else neither."""

    running: str | None = None
    made_by: str | None = None  # the task id of the creation that made it
    vmid: int | None = None
    node: str | None = None


@dataclass
class RetryTargetInput:
    """Where to try again a lab VM whose creation failed on `failed`: another of `targets`."""

    targets: list[str]
    failed: str
    memory_mb: int
