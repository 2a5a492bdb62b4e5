"""Request and response bodies of the REST API (the seed's field names, snake_case in Python).

Every answer is the envelope {code, message, data}; each endpoint's success answer names its `data` model, so
that /openapi.json documents every field, and errors are the envelope with `data` null. Field order here is
the order of the keys in the JSON answered.
"""

from __future__ import annotations

import re
from typing import Annotated, Generic, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from pydantic_core import PydanticCustomError

from db.box_options import ssh_key_problem
from payloads import MAX_LAB_VMS, Admission, CreateFromBoxInput, LabAdmission, LabInput, LabVm, PowerAction
from pve.vm_options import valid_vm_name as valid_vm_name  # re-exported for the routes

PositiveInt = Annotated[StrictInt, Field(gt=0, le=2**31 - 1)]
NonEmpty = Annotated[StrictStr, Field(min_length=1, max_length=255)]

# Unicode's control characters (C0, DEL, C1). None belongs in an id or a node or storage name; a NUL is worse:
# PostgreSQL refuses to store or even compare it.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Idempotency-Key: visible ASCII and spaces, 1 to 255 of them.
IDEMPOTENCY_KEY = re.compile(r"[\x20-\x7e]{1,255}")
# The same rules as JSON Schema patterns, so that /openapi.json documents them.
NO_CONTROL_CHARACTERS_PATTERN = r"^[^\x00-\x1f\x7f-\x9f]*$"
IDEMPOTENCY_KEY_PATTERN = rf"^{IDEMPOTENCY_KEY.pattern}$"

# The validation errors raised here, whose message completes "'<field>' ...".
OWN_ERRORS = {"control_characters", "printable_ascii", "ssh_keys", "distinct"}


def _no_control_characters(value: str) -> str:
    if CONTROL_CHARACTERS.search(value):
        raise PydanticCustomError("control_characters", "must not contain control characters")
    return value


def _distinct(values: list[str] | None) -> list[str] | None:
    """A list that names nothing twice (a node named twice in `targets` is a client's mistake, not a weight)."""
    twice = next((value for n, value in enumerate(values or []) if value in (values or [])[:n]), None)
    if twice is not None:
        raise PydanticCustomError("distinct", "names '{twice}' twice", {"twice": twice})
    return values


def printable_key(value: str | None) -> str | None:
    if value is not None and not IDEMPOTENCY_KEY.fullmatch(value):
        raise PydanticCustomError("printable_ascii", "must be 1 to 255 printable ASCII characters or spaces")
    return value


# A box id, a node or a storage name.
Identifier = Annotated[
    NonEmpty,
    Field(json_schema_extra={"pattern": NO_CONTROL_CHARACTERS_PATTERN}),
    AfterValidator(_no_control_characters),
]


def _ssh_keys(value: object) -> list[str]:
    # Checked whole, so that the 400 names `sshKeys` (not an index) and says which key is wrong.
    if not isinstance(value, list):
        raise PydanticCustomError("ssh_keys", "must be a list of public keys")
    for index, key in enumerate(value):
        if (problem := ssh_key_problem(key)) is not None:
            raise PydanticCustomError("ssh_keys", "item {index} {problem}", {"index": index, "problem": problem})
    return value


# OpenSSH public key lines (`ssh-ed25519 AAAA... comment`), by the rule `boxctl load` checks a box's keys with: a
# key PVE would refuse at configure, after the clone, is refused here instead.
SshKeys = Annotated[
    list[str],
    BeforeValidator(_ssh_keys),
    Field(json_schema_extra={"items": {"type": "string", "pattern": NO_CONTROL_CHARACTERS_PATTERN}}),
]


class CreateFromBoxRequest(BaseModel):
    # Only the seed's names: an unknown field (a typo such as `storge`, or `cpu_cores` for `cpuCores`) is a 400
    # naming it, never silently dropped or taken as an alias.
    model_config = ConfigDict(extra="forbid", validate_by_name=False, validate_by_alias=True)

    box_id: Identifier
    name: StrictStr
    target: Identifier
    cpu_cores: PositiveInt = Field(alias="cpuCores")
    memory_mb: PositiveInt = Field(alias="memorySize")
    disk_gb: PositiveInt = Field(alias="diskSize")
    storage: Identifier | None = None
    ssh_keys: SshKeys = Field(default=[], alias="sshKeys", description="public keys added to the box's cloud-init")
    start: StrictBool | None = Field(default=None, description="start the VM once configured; null: as the box says")

    def to_input(self, username: str, default_storage: str) -> CreateFromBoxInput:
        return CreateFromBoxInput(
            username=username,
            box_id=self.box_id,
            name=self.name,
            target=self.target,
            cpu_cores=self.cpu_cores,
            memory_mb=self.memory_mb,
            disk_gb=self.disk_gb,
            storage=self.storage or default_storage,
            ssh_keys=list(self.ssh_keys),
            start=self.start,
        )


class LabRequest(BaseModel):
    # As createFromBoxTemplate's body: an unknown field is a 400 naming it.
    model_config = ConfigDict(extra="forbid", validate_by_name=False, validate_by_alias=True)

    box_id: Identifier
    name: StrictStr = Field(description="the VMs are named <name>-01 .. <name>-NN")
    count: StrictInt = Field(ge=1, le=MAX_LAB_VMS)
    targets: Annotated[list[Identifier] | None, AfterValidator(_distinct)] = Field(
        default=None,
        min_length=1,
        max_length=64,
        description="the nodes to spread the VMs over, each once; omitted: every online node",
    )
    cpu_cores: PositiveInt = Field(alias="cpuCores")
    memory_mb: PositiveInt = Field(alias="memorySize")
    disk_gb: PositiveInt = Field(alias="diskSize")
    storage: Identifier | None = None
    ssh_keys: SshKeys = Field(default=[], alias="sshKeys", description="public keys added to the box's cloud-init")
    start: StrictBool | None = Field(default=None, description="start the VMs once configured; null: as the box says")

    def to_input(self, username: str, default_storage: str) -> LabInput:
        return LabInput(
            username=username,
            box_id=self.box_id,
            name=self.name,
            count=self.count,
            cpu_cores=self.cpu_cores,
            memory_mb=self.memory_mb,
            disk_gb=self.disk_gb,
            targets=list(self.targets) if self.targets else None,
            storage=self.storage or default_storage,
            ssh_keys=list(self.ssh_keys),
            start=self.start,
        )


# ------------------------------------------------------------------------------ answers

DataT = TypeVar("DataT")
TaskStatus = Literal["running", "succeeded", "failed", "cancelled"]


class Envelope(BaseModel, Generic[DataT]):
    code: int = Field(description="the HTTP status of the answer")
    message: str
    data: DataT


class AdmissionData(BaseModel):
    task_id: str = Field(description="the Temporal workflow id of the run; GET tasks/{task_id} follows it")
    vm_name: str
    vmid: str = Field(description="the VMID the new VM has on PVE", examples=["106"])

    @classmethod
    def of(cls, admission: Admission) -> AdmissionData:
        return cls(task_id=admission.task_id, vm_name=admission.vm_name, vmid=str(admission.vmid))


class LabVmData(BaseModel):
    vm_name: str
    vmid: str | None = Field(
        description="a VM tried again: null until its new creation is admitted (GET tasks/{task_id}) or has ended "
        "(GET tasks), and again null if that creation failed",
        examples=["106"],
    )
    node: str
    task_id: str = Field(description="its creation's task id (a new one when it was tried again)")

    @classmethod
    def of(cls, vm: LabVm) -> LabVmData:
        return cls(
            vm_name=vm.vm_name, vmid=str(vm.vmid) if vm.vmid is not None else None, node=vm.node, task_id=vm.task_id
        )


class LabVmState(LabVmData):
    status: TaskStatus = Field(description="its creation's")

    @classmethod
    def of(cls, vm: LabVm) -> LabVmState:
        return cls(**LabVmData.of(vm).model_dump(), status=vm.status)  # type: ignore[arg-type]


class TaskStateData(BaseModel):
    task_id: str
    status: TaskStatus
    kind: str = Field(description="the task's workflow: create, delete, power or lab", examples=["create"])
    step: str = Field(
        description="a creation: admission, clone, configure, start, cleanup or done; "
        "a deletion: stop, destroy or done; "
        "a power action: power or done; a lab: admission, vms or done"
    )
    vmid: str | None = Field(description="known once the request is admitted", examples=["106"])
    vm_name: str
    node: str
    result_code: int | None = Field(description="once ended: what a synchronous call would have answered")
    result_message: str | None
    started_at: str | None = Field(description="UTC, to the second", examples=["2026-11-27T10:00:00Z"])
    finished_at: str | None = Field(description="null while the run goes on")
    ip_addresses: list[str] | None = Field(
        description="a creation's: the addresses its guest agent reported, IPv4 first, loopback and link-local "
        "left out (empty until one came, or when the VM is not started); null for other tasks",
        examples=[["192.0.2.10"]],
    )
    vms: list[LabVmState] | None = Field(description="a lab's VMs and their states; null for other tasks")


class CreateAnswer(Envelope[AdmissionData]):
    """The request is admitted: the VM is being created under `data.task_id` (or, with ?wait, was created)."""


class TaskAnswer(Envelope[TaskStateData]):
    """The state of a task: a creation, a deletion or a power action."""


class LabAdmissionData(BaseModel):
    task_id: str = Field(description="the lab's task id; GET tasks/{task_id} follows it", examples=["lab-..."])
    vms: list[LabVmData]

    @classmethod
    def of(cls, admission: LabAdmission) -> LabAdmissionData:
        return cls(task_id=admission.task_id, vms=[LabVmData.of(vm) for vm in admission.vms])


class LabAnswer(Envelope[LabAdmissionData]):
    """The lab is admitted: every VM's name, VMID and node are fixed, and each is being created under its task."""


class ErrorAnswer(Envelope[None]):
    """A refusal or a failure: `message` says which, in the seed's words."""


# ----------------------------------------------------------------------- a VM's life, the caller's account


class DeletionData(BaseModel):
    task_id: str = Field(description="the deletion's task id; GET tasks/{task_id} follows it", examples=["delete-..."])
    vmid: str = Field(examples=["106"])


class LabDeletionData(BaseModel):
    task_id: str = Field(description="the lab's task id", examples=["lab-..."])
    deletions: list[DeletionData]


class LabDeleteAnswer(Envelope[LabDeletionData]):
    """The deletion of every VM of the lab started (or runs), one task each."""


class DeleteAnswer(Envelope[DeletionData]):
    """The deletion started (or, for a repeat while it runs, is running) under `data.task_id`."""


class VmData(BaseModel):
    vmid: str = Field(examples=["106"])
    vm_name: str
    node: str
    box_id: str | None = Field(description="null for VMs recorded before the box was kept")
    cpu_cores: int = Field(serialization_alias="cpuCores")
    memory_mb: int = Field(serialization_alias="memorySize")
    disk_gb: int = Field(serialization_alias="diskSize")
    storage: str | None = Field(description="null for VMs recorded before the storage was kept")
    task_id: str = Field(description="the creation's task id")
    created_at: str = Field(examples=["2026-11-27T10:00:00Z"])
    ip_addresses: list[str] = Field(description="IPv4 first; empty until the guest agent reported one")
    deleting: bool = Field(description="true while a deletion of the VM runs")


class VmsData(BaseModel):
    vms: list[VmData]
    next: str | None = Field(description="the `next` query parameter of the following page; null on the last")


class VmsAnswer(Envelope[VmsData]):
    """The caller's VMs that the service created and that are not deleted, newest first."""


class Limits(BaseModel):
    cores: int
    memory_mb: int
    disk_gb: int


class Totals(Limits):
    vms: int | None = Field(description="null where the plan has no limit on the count of VMs")


class Used(Limits):
    vms: int


class QuotaData(BaseModel):
    plan: str = Field(description="the plan's id")
    per_vm: Limits
    total: Totals
    used: Used = Field(description="VMs not deleted plus creations in flight, as admission counts them")
    available: Totals = Field(description="total minus used, never below 0")


class QuotaAnswer(Envelope[QuotaData]):
    """The caller's compute resource plan and how much of it is used."""


class NetworkData(BaseModel):
    bridge: str | None = Field(description="the bridge net0 is on; null: the template's")
    vlan: int | None = Field(description="net0's VLAN tag; null: the template's")


class BoxData(BaseModel):
    id: str
    name: str
    template: str = Field(description="the template's name")
    start: bool = Field(description="whether a VM made from it is started (a request's `start` overrides it)")
    cloud_init: bool = Field(description="true when the box sets cloud-init (its keys and user are not shown)")
    pool: str | None = Field(description="the PVE pool its VMs join")
    tags: list[str] = Field(description="PVE tags its VMs get, beside the template's and pve-boxes")
    network: NetworkData | None = Field(description="net0's bridge and VLAN tag, when the box sets them")


class BoxesData(BaseModel):
    boxes: list[BoxData]


class BoxesAnswer(Envelope[BoxesData]):
    """The boxes the caller may use: those whose template is public or allows the caller."""


class PowerBody(BaseModel):
    # Only `action`: an unknown field is a 400 naming it, as for createFromBoxTemplate.
    model_config = ConfigDict(extra="forbid")

    action: PowerAction = Field(description="start, shutdown (ACPI), stop (at once) or reboot")


class PowerData(BaseModel):
    task_id: str = Field(
        description="the power action's task id; GET tasks/{task_id} follows it", examples=["power-..."]
    )
    vmid: str = Field(examples=["106"])


class PowerAnswer(Envelope[PowerData]):
    """The power action started under `data.task_id`."""


class TasksData(BaseModel):
    tasks: list[TaskStateData] = Field(description="running first, then ended ones, the most recently ended first")
    next: str | None = Field(description="the `next` query parameter of the following page; null on the last")


class TasksAnswer(Envelope[TasksData]):
    """The caller's tasks: creations (refused ones too), deletions and power actions."""
