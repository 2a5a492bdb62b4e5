"""Reading the state find_drift needs from the database, PVE and Temporal, in an order that keeps a creation
running at the same time from looking like drift (see the package's docstring)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Iterable
from functools import partial
from typing import Any, TypeVar

from sqlalchemy import Engine
from sqlmodel import col, select
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from db.engine import session
from db.models import HELD, CloneSlot, CloneWaiter, Reservation, Vm
from payloads import SERVICE_TAG
from pve.client import PveClient, PveError, PveUnavailable
from pve.ownership import task_of
from pve.vm_options import tags_of
from pve.vms import guests, vm_config
from reconcile.drift import (
    NEVER_STARTED,
    NOT_FOUND,
    RUNNING,
    HeldReservation,
    Observed,
    PveVm,
    VmRecord,
    WorkflowState,
)

# The lab's workflow type (workflows.lab.LabWorkflow; the repair tool does not import the workflows).
LAB_WORKFLOW = "LabWorkflow"

T = TypeVar("T")

# Parallel Temporal describes and PVE config reads.
CONCURRENCY = 8


class ReconcileError(Exception):
    """The check could not be made at all (PVE, Temporal or the database unreachable)."""


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
            return await _not_found(temporal, task_id)
        return WorkflowState("unknown", f"Temporal: {exc}")
    status = description.status
    if status is None or status == WorkflowExecutionStatus.RUNNING:
        return RUNNING
    return WorkflowState(_closed_status(status))


# A lab's creation: the lab's workflow id, the VM's number, `-retry` for its second try (activities/lab.py).
LAB_CREATION = re.compile(r"(?P<lab>.+)-\d{2,3}(-retry)?")


async def _not_found(temporal: Client, task_id: str) -> WorkflowState:
    """NOT_FOUND, unless the task is a creation of a lab that has ended: only that lab starts it, so it never
    ran and never will (a lab its admission held quota for, terminated before it started its creations). A
    reset of the lab would hold that quota anew."""
    lab_id = match["lab"] if (match := LAB_CREATION.fullmatch(task_id)) else None
    if lab_id is None:
        return NOT_FOUND
    try:
        lab = await temporal.get_workflow_handle(lab_id).describe()
    except RPCError:
        return NOT_FOUND
    if lab.workflow_type != LAB_WORKFLOW or lab.status in (None, WorkflowExecutionStatus.RUNNING):
        return NOT_FOUND
    return WorkflowState(NEVER_STARTED, detail=f"its lab {lab_id} is {_closed_status(lab.status)}")


def _closed_status(status: WorkflowExecutionStatus) -> str:
    return status.name.lower().replace("_", " ")


def _tags(resource: dict[str, Any]) -> set[str]:
    return tags_of(resource.get("tags"))


def as_record(vm: Vm) -> VmRecord:
    return VmRecord(vm.task_id, vm.username, vm.vmid, vm.node, vm.name, vm.deleted_at is not None, vm.deleting_task_id)


def _read_records(engine: Engine) -> list[VmRecord]:
    with session(engine) as db:
        return [as_record(vm) for vm in db.exec(select(Vm)).all()]


def _read_clone_slots(engine: Engine) -> dict[str, str]:
    """The tasks holding a clone slot or queued for one: their owners."""
    with session(engine) as db:
        slots = db.exec(select(CloneSlot.task_id, CloneSlot.owner)).all()
        return dict([*slots, *db.exec(select(CloneWaiter.task_id, CloneWaiter.owner)).all()])


def reservation_states(engine: Engine, task_ids: Iterable[str]) -> dict[str, str]:
    """The state of each of these tasks' reservations; a task without one is missing."""
    with session(engine) as db:
        rows = db.exec(select(Reservation.task_id, Reservation.state).where(col(Reservation.task_id).in_(task_ids)))
        return {task_id: state for task_id, state in rows.all()}


def _read_held(engine: Engine) -> list[HeldReservation]:
    with session(engine) as db:
        rows = db.exec(select(Reservation).where(Reservation.state == HELD)).all()
        return [HeldReservation(r.task_id, r.username, r.vmid) for r in rows]


async def _list_guests(pve: PveClient) -> list[dict[str, Any]]:
    try:
        return await asyncio.to_thread(guests, pve)
    except (PveError, PveUnavailable) as exc:
        raise ReconcileError(f"cannot list the VMs on PVE: {exc}") from exc


async def observe(pve: PveClient, temporal: Client, engine: Engine) -> Observed:
    """Read the state find_drift needs, in the order the package's docstring explains."""
    records_before = await asyncio.to_thread(_read_records, engine)
    held = await asyncio.to_thread(_read_held, engine)
    slots = await asyncio.to_thread(_read_clone_slots, engine)
    known_vmids = {r.vmid for r in records_before} | {r.vmid for r in held if r.vmid is not None}

    # Which configs to read: the service's VMs are tagged, but a VM lost between clone and configure is
    # not yet (or carries its template's tags), so untagged ones and the VMIDs the database knows too.
    every_guest = await _list_guests(pve)
    present = {int(r["vmid"]): str(r["node"]) for r in every_guest}
    resources = [r for r in every_guest if r.get("type") == "qemu"]
    candidates = [r for r in resources if SERVICE_TAG in _tags(r) or not _tags(r) or int(r["vmid"]) in known_vmids]
    unreadable: dict[int, str] = {}

    async def read(resource: dict[str, Any]) -> PveVm | None:
        vmid, node = int(resource["vmid"]), str(resource["node"])
        try:
            config = await asyncio.to_thread(vm_config, pve, node, vmid)
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
    deletions = {r.deleting_task_id for r in records_before if r.deleting_task_id and not r.deleted}
    asked = sorted(
        {vm.task_id for vm in pve_vms if vm.task_id not in owned_before}
        | {r.task_id for r in held}
        | set(slots)
        | deletions
    )
    states = await _bounded([partial(workflow_state, temporal, t) for t in asked])

    records = {r.task_id: r for r in await asyncio.to_thread(_read_records, engine)}
    reservations = await asyncio.to_thread(reservation_states, engine, asked)
    return Observed(
        records_before=records_before,
        held=held,
        pve_vms=pve_vms,
        unreadable=unreadable,
        workflows=dict(zip(asked, states, strict=True)),
        records=records,
        vms_checked=len(candidates),
        clone_slots=list(slots),
        clone_slot_owners=slots,
        reservations=reservations,
        present=present,
    )
