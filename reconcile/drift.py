"""The drift between PVE, the database and Temporal, found from an observed state alone: `find_drift` is pure
(no I/O), so every rule of what counts as drift is tested without servers."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

# ------------------------------------------------------------------------------ the observed state


@dataclass(frozen=True)
class WorkflowState:
    """What Temporal says of a task's workflow: `running`, `not found`, a closed status (`completed`,
    `failed`, `terminated`, ...), or `unknown` (Temporal could not say; `error` tells why)."""

    status: str
    error: str = ""

    @property
    def running(self) -> bool:
        return self.status == "running"

    @property
    def known(self) -> bool:
        return self.status != "unknown"

    def __str__(self) -> str:
        return f"workflow {self.status}"


RUNNING = WorkflowState("running")
NOT_FOUND = WorkflowState("not found")


@dataclass(frozen=True)
class PveVm:
    """A qemu VM on PVE whose description carries a task's marker."""

    vmid: int
    node: str
    name: str
    status: str
    task_id: str
    lock: str | None = None
    template: bool = False


@dataclass(frozen=True)
class VmRecord:
    task_id: str
    username: str
    vmid: int
    node: str
    name: str
    deleted: bool = False


@dataclass(frozen=True)
class HeldReservation:
    task_id: str
    username: str
    vmid: int | None


@dataclass
class Observed:
    """Everything find_drift looks at."""

    records_before: list[VmRecord]  # every Vm row, read before PVE
    held: list[HeldReservation]  # reservations in state held, read before the workflows
    pve_vms: list[PveVm]  # VMs on PVE carrying a task marker
    unreadable: dict[int, str]  # VMIDs on PVE whose config could not be read (they may be ours): why
    workflows: dict[str, WorkflowState]  # by task id, for the tasks whose state matters
    records: dict[str, VmRecord]  # every Vm row by task id, read after the workflows
    vms_checked: int = 0  # qemu VMs on PVE whose config was read
    clone_slots: list[str] = field(default_factory=list)  # tasks holding a clone slot or queued for one


# ------------------------------------------------------------------------------------ the drift


class Kind(StrEnum):
    ORPHAN_VM = "orphan VM"
    STALE_RESERVATION = "stale reservation"
    VANISHED_VM = "VM seen deleted"
    RETURNED_VM = "VM back on PVE"
    STALE_CLONE_SLOT = "stale clone slot"


@dataclass
class Finding:
    kind: Kind
    task_id: str
    vmid: int | None = None
    node: str = ""
    username: str = ""
    reason: str = ""
    repaired: str | None = None  # what --fix did: destroyed, released, ...
    failed: str | None = None  # why --fix did not repair it

    @property
    def remaining(self) -> bool:
        return self.repaired is None

    def line(self) -> str:
        if self.kind is Kind.ORPHAN_VM:
            text = f"orphan VM {self.vmid} on {self.node} (task {self.task_id}): no successful task owns it"
        elif self.kind is Kind.STALE_RESERVATION:
            text = (
                f"stale reservation of task {self.task_id} ({self.username}, VMID {self.vmid}): "
                "held, but its workflow is not running"
            )
        elif self.kind is Kind.STALE_CLONE_SLOT:
            text = f"stale clone slot of task {self.task_id}: held or queued, but its workflow is not running"
        elif self.kind is Kind.VANISHED_VM:
            text = (
                f"VM {self.vmid} on {self.node} (task {self.task_id}, {self.username}) is gone from PVE "
                "but still counts against the plan"
            )
        else:
            text = (
                f"VM {self.vmid} on {self.node} (task {self.task_id}, {self.username}) was seen deleted "
                "but is on PVE again"
            )
        if self.reason:
            text += f" ({self.reason})"
        if self.repaired is not None:
            text += f": {self.repaired}"
        elif self.failed is not None:
            text += f": NOT repaired, {self.failed}"
        return text


@dataclass
class Drift:
    findings: list[Finding] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _ended(observed: Observed, drift: Drift, task_id: str, left: str) -> WorkflowState | None:
    """The task's workflow state if it is known to have ended; None otherwise (with a warning if unknown)."""
    state = observed.workflows.get(task_id)
    if state is None or not state.known:
        why = state.error if state is not None else "not asked"
        drift.warnings.append(f"cannot tell whether task {task_id} is running ({why}): {left}")
        return None
    return None if state.running else state


def find_drift(observed: Observed) -> Drift:
    """The drift between PVE, the database and Temporal in `observed`. Pure."""
    drift = Drift()
    records = observed.records

    for vm in sorted(observed.pve_vms, key=lambda v: v.vmid):
        record = records.get(vm.task_id)
        if record is not None:
            # Owned: never destroyed. A VM seen deleted that is back under its VMID counts again.
            if record.deleted and record.vmid == vm.vmid:
                drift.findings.append(
                    Finding(Kind.RETURNED_VM, vm.task_id, vm.vmid, vm.node, record.username, f"VM '{vm.name}'")
                )
            continue
        state = _ended(observed, drift, vm.task_id, f"VM {vm.vmid} on {vm.node} left alone")
        if state is None:
            continue
        if vm.template:
            drift.warnings.append(
                f"VM {vm.vmid} on {vm.node} carries the marker of task {vm.task_id}, which owns nothing, "
                "but is a template: left alone"
            )
            continue
        drift.findings.append(Finding(Kind.ORPHAN_VM, vm.task_id, vm.vmid, vm.node, reason=str(state)))

    for reservation in sorted(observed.held, key=lambda r: r.task_id):
        state = _ended(observed, drift, reservation.task_id, "its reservation left held")
        if state is None:
            continue
        drift.findings.append(
            Finding(
                Kind.STALE_RESERVATION,
                reservation.task_id,
                reservation.vmid,
                username=reservation.username,
                reason=str(state),
            )
        )

    for task_id in sorted(set(observed.clone_slots)):
        state = observed.workflows.get(task_id)
        if state is not None and state.known and not state.running:
            drift.findings.append(Finding(Kind.STALE_CLONE_SLOT, task_id, reason=str(state)))

    on_pve = {(vm.vmid, vm.task_id) for vm in observed.pve_vms}
    for record in sorted(observed.records_before, key=lambda r: (r.vmid, r.task_id)):
        now = records.get(record.task_id, record)
        if record.deleted or now.deleted or (record.vmid, record.task_id) in on_pve:
            continue
        if record.vmid in observed.unreadable:
            drift.warnings.append(
                f"cannot tell whether VM {record.vmid} of task {record.task_id} is still on PVE "
                f"({observed.unreadable[record.vmid]}): left counting"
            )
            continue
        drift.findings.append(
            Finding(Kind.VANISHED_VM, record.task_id, record.vmid, record.node, record.username, f"VM '{record.name}'")
        )
    return drift
