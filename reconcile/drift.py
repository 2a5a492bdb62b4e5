"""The drift between PVE, the database and Temporal, found from an observed state alone: `find_drift` is pure
(no I/O), so every rule of what counts as drift, of what is evidence that a run is over (`evidence_of_end`)
and of when the repair refuses to act (`Drift.refusals`) is tested without servers."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from db.models import COMMITTED, HELD, RELEASED

# ------------------------------------------------------------------------------ the observed state


@dataclass(frozen=True)
class WorkflowState:
    """What Temporal says of a task's workflow: `running`, `not found`, a closed status (`completed`,
    `failed`, `terminated`, ...), or `unknown` (Temporal could not say; `error` tells why)."""

    status: str
    error: str = ""
    detail: str = ""  # what made it known (NEVER_STARTED: the lab that would have started it)

    @property
    def running(self) -> bool:
        return self.status == "running"

    @property
    def known(self) -> bool:
        return self.status != "unknown"

    @property
    def ended_without_success(self) -> bool:
        """Temporal knows the run and it ended without making its VM: nothing of it acts any more."""
        return self.status in ENDED_WITHOUT_SUCCESS

    @property
    def closed(self) -> bool:
        """Temporal knows the run and it has ended, successfully or not."""
        return self.status in CLOSED

    def __str__(self) -> str:
        return f"workflow {self.status}" + (f", {self.detail}" if self.detail else "")


# Temporal's closed statuses (WorkflowExecutionStatus names, lower case, spaces for `_`). A creation ends
# `completed` only when it made and recorded its VM; every failure, refusal included, ends `failed`.
# A lab's creation that Temporal does not know, whose lab has ended, never ran and never will: "never started".
NEVER_STARTED = "never started"
ENDED_WITHOUT_SUCCESS = frozenset({"failed", "canceled", "terminated", "timed out", NEVER_STARTED})
CLOSED = ENDED_WITHOUT_SUCCESS | {"completed", "continued as new"}
RUNNING = WorkflowState("running")
NOT_FOUND = WorkflowState("not found")
COMPLETED = WorkflowState("completed")


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
    deleting_task_id: str | None = None  # the deletion that marked it as being deleted


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
    clone_slot_owners: dict[str, str] = field(default_factory=dict)  # their owners, where known
    # The state of the reservation (held, committed, released) of each task asked about, read after the
    # workflows; a task without one is missing.
    reservations: dict[str, str] = field(default_factory=dict)
    present: dict[int, str] = field(default_factory=dict)  # every guest's VMID on PVE, marked or not: its node


# ------------------------------------------------------------------------------------ the drift


class Kind(StrEnum):
    ORPHAN_VM = "orphan VM"
    STALE_RESERVATION = "stale reservation"
    VANISHED_VM = "VM seen deleted"
    RETURNED_VM = "VM back on PVE"
    STALE_CLONE_SLOT = "stale clone slot"
    UNFINISHED_DELETION = "unfinished deletion"
    STALE_DELETION_MARK = "stale deletion mark"


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
    deletion: str = ""  # the deletion's task id, for the two kinds of a deletion left half done

    @property
    def remaining(self) -> bool:
        return self.repaired is None

    def line(self) -> str:
        if self.kind is Kind.ORPHAN_VM:
            text = f"orphan VM {self.vmid} on {self.node} (task {self.task_id}): no successful task owns it"
        elif self.kind is Kind.STALE_RESERVATION:
            text = (
                f"stale reservation of task {self.task_id} ({self.username}, "
                f"{'no VMID yet' if self.vmid is None else f'VMID {self.vmid}'}): "
                "held, but its workflow is not running"
            )
        elif self.kind is Kind.STALE_CLONE_SLOT:
            whose = f" ({self.username})" if self.username else ""  # none on slots taken before owners were kept
            text = f"stale clone slot of task {self.task_id}{whose}: held or queued, but its workflow is not running"
        elif self.kind is Kind.VANISHED_VM:
            text = (
                f"VM {self.vmid} on {self.node} (task {self.task_id}, {self.username}) is gone from PVE "
                "but still counts against the plan"
            )
        elif self.kind is Kind.UNFINISHED_DELETION:
            text = (
                f"VM {self.vmid} on {self.node} (task {self.task_id}, {self.username}) is gone from PVE, but its "
                "deletion ended before giving its resources back"
            )
        elif self.kind is Kind.STALE_DELETION_MARK:
            text = (
                f"VM {self.vmid} on {self.node} (task {self.task_id}, {self.username}) is still marked as being "
                "deleted, but its deletion ended without deleting it"
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
    refusals: list[str] = field(default_factory=list)  # why --fix would do nothing at all; empty: it may act

    @property
    def destroys(self) -> int:
        return sum(1 for f in self.findings if f.kind is Kind.ORPHAN_VM)


# ------------------------------------------------------------------------------- the evidence


def evidence_of_end(state: WorkflowState | None, reservation: str | None, *, success_too: bool = False) -> str | None:
    """Why the task's run is known to be over without success, so that what it left may be repaired; None if
    that is not known. `success_too`: a run that succeeded counts too (for a clone slot, which a successful
    run frees before it ends).

    Only positive knowledge counts: Temporal knows the run and it ended (failed, cancelled, terminated, timed
    out), or Temporal does not know it and the database shows its reservation released (the run gave up and
    cleaned up; its history is past retention). "Not found" alone is no evidence: Temporal also answers it
    for a run that goes on in another namespace (a wrong TEMPORAL_NAMESPACE)."""
    if state is None:
        return None
    if state.ended_without_success or (success_too and state.closed):
        return str(state)
    if state == NOT_FOUND and reservation == RELEASED:
        return f"{state}, its reservation released"
    return None


def why_left(state: WorkflowState | None, reservation: str | None) -> str | None:
    """Why the task's leftovers are left alone although no evidence says its run is over; None when that
    needs no word (its run is going on)."""
    if state is None or not state.known:
        return f"cannot tell whether its run is going on ({state.error if state is not None else 'not asked'})"
    if state.running:
        return None
    if state.status == "completed":
        return "its run succeeded; an operator decides (is DATABASE_URL the service's database?)"
    if state != NOT_FOUND:
        return f"{state}"
    if reservation == HELD:
        return (
            "Temporal does not know its run and its reservation is held: it may be running in another namespace "
            "(is TEMPORAL_NAMESPACE right?) or be past retention; an operator decides"
        )
    if reservation == COMMITTED:
        return "Temporal does not know its run and its reservation is committed (its VM was made); an operator decides"
    return (
        "neither Temporal nor the database knows the task: another installation's, or a wrong database or "
        "namespace; an operator decides"
    )


# ------------------------------------------------------------------------------------- the rules


def find_drift(observed: Observed, max_destroy: int = 5) -> Drift:
    """The drift between PVE, the database and Temporal in `observed`, and why --fix would refuse to act on
    it (at all: it never repairs part of a drift it refuses). Pure."""
    drift = Drift()
    records = observed.records

    def evidence(task_id: str, success_too: bool = False) -> str | None:
        return evidence_of_end(
            observed.workflows.get(task_id), observed.reservations.get(task_id), success_too=success_too
        )

    def left(task_id: str, what: str) -> None:
        why = why_left(observed.workflows.get(task_id), observed.reservations.get(task_id))
        if why is not None:
            drift.warnings.append(f"{what} left alone: {why}")

    for vm in sorted(observed.pve_vms, key=lambda v: v.vmid):
        record = records.get(vm.task_id)
        if record is not None:
            # Owned: never destroyed. A VM seen deleted that is back under its VMID counts again.
            if record.deleted and record.vmid == vm.vmid:
                drift.findings.append(
                    Finding(Kind.RETURNED_VM, vm.task_id, vm.vmid, vm.node, record.username, f"VM '{vm.name}'")
                )
            continue
        ended = evidence(vm.task_id)
        if ended is None:
            left(vm.task_id, f"VM {vm.vmid} on {vm.node}, made by task {vm.task_id}, has no record and is")
            continue
        if vm.template:
            drift.warnings.append(
                f"VM {vm.vmid} on {vm.node} carries the marker of task {vm.task_id}, which owns nothing, "
                "but is a template: left alone"
            )
            continue
        drift.findings.append(Finding(Kind.ORPHAN_VM, vm.task_id, vm.vmid, vm.node, reason=ended))

    for reservation in sorted(observed.held, key=lambda r: r.task_id):
        ended = evidence(reservation.task_id)
        if ended is None:
            left(reservation.task_id, f"the held reservation of task {reservation.task_id} ({reservation.username}) is")
            continue
        drift.findings.append(
            Finding(
                Kind.STALE_RESERVATION,
                reservation.task_id,
                reservation.vmid,
                username=reservation.username,
                reason=ended,
            )
        )

    for task_id in sorted(set(observed.clone_slots)):
        ended = evidence(task_id, success_too=True)
        owner = observed.clone_slot_owners.get(task_id, "")
        if ended is None:
            left(task_id, f"the clone slot of task {task_id} ({f'{owner}, ' if owner else ''}held or queued for) is")
            continue
        drift.findings.append(Finding(Kind.STALE_CLONE_SLOT, task_id, username=owner, reason=ended))

    on_pve = {(vm.vmid, vm.task_id) for vm in observed.pve_vms}
    for record in sorted(observed.records_before, key=lambda r: (r.vmid, r.task_id)):
        now = records.get(record.task_id, record)
        if record.deleted or now.deleted or _deletion_runs(observed, record):
            continue
        unfinished = _deletion_over(observed, record, now, drift)
        if (record.vmid, record.task_id) in on_pve:
            if unfinished is not None:  # the VM is still there: its owner may ask again
                unfinished.kind = Kind.STALE_DELETION_MARK
                drift.findings.append(unfinished)
            continue
        if record.vmid in observed.unreadable:
            drift.warnings.append(
                f"cannot tell whether VM {record.vmid} of task {record.task_id} is still on PVE "
                f"({observed.unreadable[record.vmid]}): left counting"
            )
            continue
        if record.vmid in observed.present:
            # Reused outside the service, or its notes edited: either way not provably gone, so it keeps counting
            # (marking it deleted here would let anyone who can edit notes get round the plan).
            drift.warnings.append(
                f"VM {record.vmid} on {observed.present[record.vmid]} does not carry task {record.task_id}'s "
                f"marker: left counting against {record.username}'s plan (an operator decides)"
            )
            continue
        if unfinished is not None:
            drift.findings.append(unfinished)
            continue
        drift.findings.append(
            Finding(Kind.VANISHED_VM, record.task_id, record.vmid, record.node, record.username, f"VM '{record.name}'")
        )

    if not observed.records_before and observed.pve_vms:
        drift.refusals.append(
            f"the database holds no VM records at all while PVE shows {len(observed.pve_vms)} VMs carrying the "
            "service's marker: a new or wrong database (is DATABASE_URL right?)"
        )
    if drift.destroys > max_destroy:
        drift.refusals.append(
            f"it would destroy {drift.destroys} VMs, more than --max-destroy {max_destroy}: check them above, "
            f"then run again with --max-destroy {drift.destroys}"
        )
    return drift


def _deletion_runs(observed: Observed, record: VmRecord) -> bool:
    """A deletion of the record runs: it ends the record's life itself, whatever PVE shows meanwhile."""
    state = observed.workflows.get(record.deleting_task_id or "")
    return state is not None and state.running


def _deletion_over(observed: Observed, record: VmRecord, now: VmRecord, drift: Drift) -> Finding | None:
    """The record's deletion as a finding (UNFINISHED_DELETION; the caller makes it a STALE_DELETION_MARK when
    the VM is still there) if its run is known to be over without success, the evidence its repair needs.
    None if it has none, or one whose end is not known (said in a warning: the mark stays, and the record is
    judged as any other)."""
    deletion = record.deleting_task_id
    if deletion is None or now.deleting_task_id != deletion:
        return None  # none, or one begun since: looked at next time
    state = observed.workflows.get(deletion)
    ended = evidence_of_end(state, None)
    if ended is None:
        drift.warnings.append(
            f"VM {record.vmid} (task {record.task_id}) is marked as being deleted by {deletion}, whose run is not "
            f"known to be over ({state or 'not asked'}): left marked"
        )
        return None
    reason = f"{deletion} {ended}"
    return Finding(
        Kind.UNFINISHED_DELETION, record.task_id, record.vmid, record.node, record.username, reason, deletion=deletion
    )
