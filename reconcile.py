"""`boxctl reconcile`: compare PVE with the database and Temporal, report the drift, and repair it on request.

Four kinds of drift:

- orphan VM: a VM on PVE whose description carries the service's marker (`payloads.vm_description`) for a
  task that owns no `Vm` row and whose workflow is not running (not found, or closed). Repair: destroy it.
- stale reservation: a reservation still held although its workflow is not running. Repair: release it.
- VM seen deleted: a live `Vm` row whose VM is no longer on PVE (no VM with that VMID carries the task's
  marker). Repair: set its `deleted_at`, so that it stops counting against its owner's plan.
- VM back on PVE: a `Vm` row already seen deleted whose VM is on PVE again (restored from a backup, say).
  Repair: clear `deleted_at`, so that it counts again. Such a VM is never destroyed.
- stale clone slot: a clone slot held, or a place in the queue for one, by a task whose workflow is not
  running (an operator terminated it, so its cleanup never ran). Repair: free it, hand it to the next
  waiting run and tell that run.

State is read in an order that keeps a creation running at the same time from looking like drift: the
`Vm` rows and held reservations before PVE (a row is written only after its VM exists on PVE), PVE before
the workflows, and the workflows before the `Vm` rows that decide whether a VM is owned (a run commits its
row before its workflow closes). A VM whose ownership cannot be told (config unreadable, node offline,
Temporal error) is left alone and reported as a warning. Every repair checks its finding again just
before it acts.

`find_drift` is pure: it turns an `Observed` state into a `Drift`. `observe` reads that state, `repair`
acts on a `Drift`, and `reconcile` does all three for boxctl.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from typing import Any, TypeVar

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import select
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from activities.pve_client import PveClient, PveError, PveUnavailable
from db import clone_slots, quota
from db.engine import init_db, make_engine, session
from db.models import HELD, CloneSlot, CloneWaiter, Reservation, Vm, utcnow
from payloads import OWNER_MARK, SERVICE_TAG
from settings import Settings

T = TypeVar("T")

MARKER = re.compile(re.escape(OWNER_MARK) + r"(\S+)")
TAG_SEPARATORS = re.compile(r"[;, ]+")
# How long a stop or destroy task on PVE may take before the repair gives up on it.
PVE_TASK_TIMEOUT_SECONDS = 300.0
# Parallel Temporal describes and PVE config reads.
CONCURRENCY = 8


class ReconcileError(Exception):
    """The check could not be made at all (PVE, Temporal or the database unreachable)."""


def task_of(description: Any) -> str | None:
    """The task id in a VM description carrying the service's marker, or None."""
    match = MARKER.search(str(description or ""))
    return match.group(1) if match else None


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


# ------------------------------------------------------------------------------ reading the state


class AsyncPve:
    """PveClient's blocking calls, off the event loop."""

    def __init__(self, client: PveClient):
        self.client = client

    async def get(self, path: str, **params: Any) -> Any:
        return await asyncio.to_thread(self.client.get, path, **params)

    async def post(self, path: str, **params: Any) -> Any:
        return await asyncio.to_thread(self.client.post, path, **params)

    async def delete(self, path: str, **params: Any) -> Any:
        return await asyncio.to_thread(self.client.delete, path, **params)


async def _bounded(calls: Iterable[Callable[[], Awaitable[T]]], limit: int = CONCURRENCY) -> list[T]:
    semaphore = asyncio.Semaphore(limit)

    async def one(call: Callable[[], Awaitable[T]]) -> T:
        async with semaphore:
            return await call()

    return list(await asyncio.gather(*(one(c) for c in calls)))


async def workflow_state(temporal: Client, task_id: str) -> WorkflowState:
    """The state of the workflow whose id is task_id. Any workflow running under that id counts as running."""
    try:
        description = await temporal.get_workflow_handle(task_id).describe()
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            return NOT_FOUND
        return WorkflowState("unknown", f"Temporal: {exc}")
    status = description.status
    if status is None or status == WorkflowExecutionStatus.RUNNING:
        return RUNNING
    return WorkflowState(status.name.lower().replace("_", " "))


def _tags(resource: dict[str, Any]) -> set[str]:
    return {t for t in TAG_SEPARATORS.split(str(resource.get("tags") or "").lower()) if t}


def _record(vm: Vm) -> VmRecord:
    return VmRecord(vm.task_id, vm.username, vm.vmid, vm.node, vm.name, vm.deleted_at is not None)


def _read_records(engine: Engine) -> list[VmRecord]:
    with session(engine) as db:
        return [_record(vm) for vm in db.exec(select(Vm)).all()]


def _read_clone_slots(engine: Engine) -> list[str]:
    with session(engine) as db:
        return [*db.exec(select(CloneSlot.task_id)).all(), *db.exec(select(CloneWaiter.task_id)).all()]


def _read_held(engine: Engine) -> list[HeldReservation]:
    with session(engine) as db:
        rows = db.exec(select(Reservation).where(Reservation.state == HELD)).all()
        return [HeldReservation(r.task_id, r.username, r.vmid) for r in rows]


async def _list_vms(pve: AsyncPve) -> list[dict[str, Any]]:
    try:
        resources = await pve.get("cluster/resources", type="vm")
    except (PveError, PveUnavailable) as exc:
        raise ReconcileError(f"cannot list the VMs on PVE: {exc}") from exc
    return [dict(r) for r in resources if r.get("type") == "qemu"]


async def _config(pve: AsyncPve, node: str, vmid: int) -> dict[str, Any] | None:
    """The VM's config; None if it no longer exists. Raises PveError/PveUnavailable if it cannot be read."""
    try:
        return dict(await pve.get(f"nodes/{node}/qemu/{vmid}/config"))
    except PveError as exc:
        if "does not exist" in exc.message:
            return None
        raise


async def observe(pve: AsyncPve, temporal: Client, engine: Engine) -> Observed:
    """Read the state find_drift needs, in the order the module's docstring explains."""
    records_before = await asyncio.to_thread(_read_records, engine)
    held = await asyncio.to_thread(_read_held, engine)
    slots = await asyncio.to_thread(_read_clone_slots, engine)
    known_vmids = {r.vmid for r in records_before} | {r.vmid for r in held if r.vmid is not None}

    # Which configs to read: the service's VMs are tagged, but a VM lost between clone and configure is
    # not yet (or carries its template's tags), so untagged ones and the VMIDs the database knows too.
    resources = await _list_vms(pve)
    candidates = [r for r in resources if SERVICE_TAG in _tags(r) or not _tags(r) or int(r["vmid"]) in known_vmids]
    unreadable: dict[int, str] = {}

    async def read(resource: dict[str, Any]) -> PveVm | None:
        vmid, node = int(resource["vmid"]), str(resource["node"])
        try:
            config = await _config(pve, node, vmid)
        except (PveError, PveUnavailable) as exc:
            unreadable[vmid] = f"config of VM {vmid} on {node} unreadable: {exc}"
            return None
        if config is None:
            return None  # removed since the listing
        task_id = task_of(config.get("description"))
        if task_id is None:
            return None
        return PveVm(
            vmid=vmid,
            node=node,
            name=str(resource.get("name") or ""),
            status=str(resource.get("status") or ""),
            task_id=task_id,
            lock=str(resource["lock"]) if resource.get("lock") else None,
            template=bool(int(resource.get("template") or 0)),
        )

    found = await _bounded([partial(read, r) for r in candidates])
    pve_vms = [vm for vm in found if vm is not None]

    owned_before = {r.task_id for r in records_before}
    asked = sorted(
        {vm.task_id for vm in pve_vms if vm.task_id not in owned_before} | {r.task_id for r in held} | set(slots)
    )
    states = await _bounded([partial(workflow_state, temporal, t) for t in asked])

    records = {r.task_id: r for r in await asyncio.to_thread(_read_records, engine)}
    return Observed(
        records_before=records_before,
        held=held,
        pve_vms=pve_vms,
        unreadable=unreadable,
        workflows=dict(zip(asked, states, strict=True)),
        records=records,
        vms_checked=len(candidates),
        clone_slots=slots,
    )


# ---------------------------------------------------------------------------------------- repair


class NotRepaired(Exception):
    """A finding that no longer holds, or that cannot be repaired now: the reason."""


def upid_node(upid: str) -> str:
    # UPID:<node>:<pid>:<pstart>:<starttime>:<type>:<id>:<user>:
    return upid.split(":")[1]


async def wait_task(pve: AsyncPve, upid: str, timeout: float = PVE_TASK_TIMEOUT_SECONDS) -> None:
    """Poll the PVE task until it stops; raise NotRepaired if it failed or took longer than timeout."""
    deadline = time.monotonic() + timeout
    interval = 0.1
    while True:
        status = await pve.get(f"nodes/{upid_node(upid)}/tasks/{upid}/status")
        if status.get("status") == "stopped":
            exit_status = str(status.get("exitstatus", ""))
            if exit_status == "OK" or exit_status.startswith("WARNINGS"):
                return
            raise NotRepaired(f"PVE task {upid} failed: {exit_status}")
        if time.monotonic() + interval > deadline:
            raise NotRepaired(f"PVE task {upid} did not end within {timeout:.0f} s")
        await asyncio.sleep(interval)
        interval = min(interval * 2, 1.0)


async def _find(pve: AsyncPve, vmid: int) -> dict[str, Any] | None:
    return next((r for r in await _list_vms(pve) if int(r["vmid"]) == vmid), None)


async def _carries(pve: AsyncPve, vmid: int, task_id: str) -> dict[str, Any] | None:
    """VM vmid's cluster resource if it is on PVE with task_id's marker; None if it is not."""
    resource = await _find(pve, vmid)
    if resource is None:
        return None
    config = await _config(pve, str(resource["node"]), vmid)
    if config is None or task_of(config.get("description")) != task_id:
        return None
    return resource


async def _not_running(temporal: Client, task_id: str) -> None:
    state = await workflow_state(temporal, task_id)
    if state.running:
        raise NotRepaired("its workflow is running now")
    if not state.known:
        raise NotRepaired(f"cannot tell whether its workflow is running ({state.error})")


def _record_of(engine: Engine, task_id: str) -> VmRecord | None:
    with session(engine) as db:
        vm = db.get(Vm, task_id)
        return _record(vm) if vm is not None else None


async def destroy_orphan(finding: Finding, pve: AsyncPve, temporal: Client, engine: Engine) -> str:
    assert finding.vmid is not None
    await _not_running(temporal, finding.task_id)
    if await asyncio.to_thread(_record_of, engine, finding.task_id) is not None:
        raise NotRepaired("its task owns it now")
    resource = await _carries(pve, finding.vmid, finding.task_id)
    if resource is None:
        return "already gone"
    node = str(resource["node"])
    if resource.get("lock"):
        raise NotRepaired(f"the VM is locked ({resource['lock']}); try again once that ends")
    if resource.get("status") == "running":
        upid = await pve.post(f"nodes/{node}/qemu/{finding.vmid}/status/stop")
        if upid:
            await wait_task(pve, str(upid))
    upid = await pve.delete(f"nodes/{node}/qemu/{finding.vmid}", purge=1, **{"destroy-unreferenced-disks": 1})
    if upid:
        await wait_task(pve, str(upid))
    return "destroyed"


async def release_reservation(finding: Finding, temporal: Client, engine: Engine) -> str:
    await _not_running(temporal, finding.task_id)
    released = await asyncio.to_thread(quota.release, engine, finding.task_id)
    return "released" if released else "no longer held"


def _set_deleted(engine: Engine, task_id: str, deleted: bool) -> bool:
    with session(engine) as db, db.begin():
        vm = db.get(Vm, task_id)
        if vm is None:
            return False
        quota.lock_user(db, vm.username)
        db.refresh(vm)
        if (vm.deleted_at is not None) == deleted:
            return False
        vm.deleted_at = utcnow() if deleted else None
        return True


async def mark_deleted(finding: Finding, pve: AsyncPve, engine: Engine) -> str:
    assert finding.vmid is not None
    if await _carries(pve, finding.vmid, finding.task_id) is not None:
        raise NotRepaired("the VM is on PVE again")
    changed = await asyncio.to_thread(_set_deleted, engine, finding.task_id, True)
    return "marked deleted" if changed else "already marked deleted"


async def count_again(finding: Finding, pve: AsyncPve, engine: Engine) -> str:
    assert finding.vmid is not None
    if await _carries(pve, finding.vmid, finding.task_id) is None:
        raise NotRepaired("the VM is gone again")
    changed = await asyncio.to_thread(_set_deleted, engine, finding.task_id, False)
    return "counted again" if changed else "already counted"


async def free_clone_slot(finding: Finding, temporal: Client, engine: Engine, settings: Settings) -> str:
    """Free the slot and tell the runs it is handed to, as a run freeing its own slot does: a run handed the slot
    sleeps until told (or looks again within minutes), and one that has ended meanwhile has its slot freed
    in turn, so that the next in line gets it."""
    await _not_running(temporal, finding.task_id)
    to_free, told, untold = [finding.task_id], list[str](), list[str]()
    while to_free:
        granted = await asyncio.to_thread(
            clone_slots.release, engine, to_free.pop(), settings.clone_limit_per_node, settings.clone_limit_per_storage
        )
        for waiter in granted:
            try:
                await temporal.get_workflow_handle(waiter).signal("clone_slot_granted")
                told.append(waiter)
            except RPCError as exc:
                (to_free if exc.status == RPCStatusCode.NOT_FOUND else untold).append(waiter)
    return (
        "freed"
        + (f", handed to {', '.join(told)}" if told else "")
        + (f", handed to {', '.join(untold)} (not told: it looks again within minutes)" if untold else "")
    )


async def repair(drift: Drift, pve: AsyncPve, temporal: Client, engine: Engine, settings: Settings) -> None:
    """Repair every finding of `drift`, one by one, recording on each what was done or why not."""
    for finding in drift.findings:
        try:
            if finding.kind is Kind.STALE_CLONE_SLOT:
                finding.repaired = await free_clone_slot(finding, temporal, engine, settings)
            elif finding.kind is Kind.ORPHAN_VM:
                finding.repaired = await destroy_orphan(finding, pve, temporal, engine)
            elif finding.kind is Kind.STALE_RESERVATION:
                finding.repaired = await release_reservation(finding, temporal, engine)
            elif finding.kind is Kind.VANISHED_VM:
                finding.repaired = await mark_deleted(finding, pve, engine)
            else:
                finding.repaired = await count_again(finding, pve, engine)
        except NotRepaired as exc:
            finding.failed = str(exc)
        except (PveError, PveUnavailable, ReconcileError) as exc:
            finding.failed = f"PVE: {exc}"
        except SQLAlchemyError as exc:
            finding.failed = f"database: {exc}"


# ---------------------------------------------------------------------------------------- report


@dataclass
class Report:
    drift: Drift
    fix: bool
    vms_checked: int = 0
    records: int = 0
    held: int = 0

    @property
    def remaining(self) -> list[Finding]:
        return [f for f in self.drift.findings if f.remaining]

    @property
    def exit_code(self) -> int:
        """0 when consistent or fully repaired; 1 when findings remain or something could not be checked."""
        return 1 if self.remaining or self.drift.warnings else 0

    def lines(self) -> list[str]:
        lines = [f.line() for f in self.drift.findings]
        lines += [f"warning: {w}" for w in self.drift.warnings]
        checked = (
            f"checked VMs on PVE: {self.vms_checked}, live VM records: {self.records}, held reservations: {self.held}"
        )
        findings = self.drift.findings
        if not findings:
            summary = f"consistent: {checked}"
        else:
            counts = ", ".join(
                f"{kind.value}: {n}" for kind in Kind if (n := sum(1 for f in findings if f.kind is kind))
            )
            summary = f"{len(findings)} findings ({counts})"
            if self.fix:
                summary += f": {len(findings) - len(self.remaining)} repaired, {len(self.remaining)} remaining"
            else:
                summary += ": run with --fix to repair"
            summary += f"; {checked}"
        if self.drift.warnings:
            summary += f"; {len(self.drift.warnings)} warnings"
        return [*lines, summary]


async def reconcile(
    settings: Settings,
    fix: bool,
    *,
    temporal: Client | None = None,
    engine: Engine | None = None,
    pve: PveClient | None = None,
) -> Report:
    """Compare PVE with the database and Temporal; with `fix`, repair what differs."""
    own_engine = engine is None
    if engine is None:
        engine = make_engine(settings.database_url)
    try:
        if own_engine:
            await asyncio.to_thread(init_db, engine)
        if temporal is None:
            try:
                temporal = await Client.connect(settings.temporal_address, namespace=settings.temporal_namespace)
            except Exception as exc:
                raise ReconcileError(f"cannot reach Temporal at {settings.temporal_address}: {exc}") from exc
        api = AsyncPve(pve or PveClient(settings))
        try:
            observed = await observe(api, temporal, engine)
            drift = find_drift(observed)
            if fix:
                await repair(drift, api, temporal, engine, settings)
        except SQLAlchemyError as exc:
            raise ReconcileError(f"database: {exc}") from exc
        return Report(
            drift=drift,
            fix=fix,
            vms_checked=observed.vms_checked,
            records=sum(1 for r in observed.records_before if not r.deleted),
            held=len(observed.held),
        )
    finally:
        if own_engine:
            engine.dispose()
