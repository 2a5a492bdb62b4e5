"""Repairing the drift: each repair checks its finding again just before it acts (the same evidence that
its task's run is over, `reconcile.drift.evidence_of_end`), never touches a VM that does not carry the
finding's task marker (pve.ownership's rule), and writes what it did to the audit table (reconcile.audit)."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session
from temporalio.client import Client
from temporalio.service import RPCError

from db import clone_slots, quota
from db.engine import session
from db.models import HELD, RELEASED, Reservation, Vm, utcnow
from pve.client import PveClient, PveError, PveUnavailable
from pve.ownership import is_owned_by
from pve.vms import find_vm, stop_and_destroy, vm_config
from reconcile import audit
from reconcile.drift import Drift, Finding, Kind, VmRecord, evidence_of_end
from reconcile.observe import as_record, reservation_states, workflow_state
from settings import Settings
from workflows.clone_turns import tell_slot_granted

# How long a stop or destroy task on PVE may take before the repair gives up on it.
PVE_TASK_TIMEOUT_SECONDS = 300.0


class NotRepaired(Exception):
    """A finding that no longer holds, or that cannot be repaired now: the reason."""


async def _carries(pve: PveClient, vmid: int, task_id: str) -> dict[str, Any] | None:
    """VM vmid's cluster resource if it is on PVE with task_id's marker; None if it is not."""
    resource = await asyncio.to_thread(find_vm, pve, vmid)
    if resource is None or resource.get("type") != "qemu":
        return None
    config = await asyncio.to_thread(vm_config, pve, str(resource["node"]), vmid)
    if config is None or not is_owned_by(config.get("description"), task_id):
        return None
    return resource


async def run_is_over(temporal: Client, engine: Engine, task_id: str, *, success_too: bool = False) -> str | None:
    """The evidence, as of now, that the task's run is over (see evidence_of_end); None if there is none."""
    state = await workflow_state(temporal, task_id)
    reservation = (await asyncio.to_thread(reservation_states, engine, [task_id])).get(task_id)
    return evidence_of_end(state, reservation, success_too=success_too)


async def _require_over(temporal: Client, engine: Engine, task_id: str, *, success_too: bool = False) -> None:
    if await run_is_over(temporal, engine, task_id, success_too=success_too) is None:
        raise NotRepaired("its run is no longer known to be over")


def _record_of(engine: Engine, task_id: str) -> VmRecord | None:
    with session(engine) as db:
        vm = db.get(Vm, task_id)
        return as_record(vm) if vm is not None else None


async def destroy_orphan(finding: Finding, pve: PveClient, temporal: Client, engine: Engine) -> str:
    assert finding.vmid is not None
    await _require_over(temporal, engine, finding.task_id)
    if await asyncio.to_thread(_record_of, engine, finding.task_id) is not None:
        raise NotRepaired("its task owns it now")
    resource = await _carries(pve, finding.vmid, finding.task_id)
    if resource is None:
        return "already gone"
    if resource.get("lock"):
        raise NotRepaired(f"the VM is locked ({resource['lock']}); try again once that ends")
    await asyncio.to_thread(
        stop_and_destroy,
        pve,
        str(resource["node"]),
        finding.vmid,
        running=resource.get("status") == "running",
        limit=PVE_TASK_TIMEOUT_SECONDS,
    )
    return await asyncio.to_thread(audit.write, engine, finding, "destroyed")


def _release(engine: Engine, finding: Finding) -> bool:
    """quota.release, with its audit row in the same transaction."""
    with session(engine) as db, db.begin():
        reservation = db.get(Reservation, finding.task_id)
        if reservation is None or reservation.state != HELD:
            return False
        quota.lock_user(db, reservation.username)
        db.refresh(reservation)  # as it is now that nothing else can change it
        if reservation.state != HELD:
            return False
        reservation.state = RELEASED
        reservation.updated_at = utcnow()
        audit.add(db, finding, "released", reservation.username)
        return True


async def release_reservation(finding: Finding, temporal: Client, engine: Engine) -> str:
    await _require_over(temporal, engine, finding.task_id)
    released = await asyncio.to_thread(_release, engine, finding)
    return "released" if released else "no longer held"


def _locked_vm(db: Session, task_id: str) -> Vm | None:
    """The task's VM row as it is now that its owner's usage is locked (what counts against a plan changes only
    under that lock)."""
    vm = db.get(Vm, task_id)
    if vm is not None:
        quota.lock_user(db, vm.username)
        db.refresh(vm)
    return vm


def _set_deleted(engine: Engine, finding: Finding, deleted: bool, action: str) -> bool:
    """Mark the task's VM row deleted (or not), with its audit row in the same transaction."""
    with session(engine) as db, db.begin():
        vm = _locked_vm(db, finding.task_id)
        if vm is None:
            return False
        if (vm.deleted_at is not None) == deleted:
            return False
        vm.deleted_at = utcnow() if deleted else None
        audit.add(db, finding, action, vm.username)
        return True


async def mark_deleted(finding: Finding, pve: PveClient, engine: Engine) -> str:
    assert finding.vmid is not None
    # Only a VMID gone from PVE altogether: one holding a VM without the marker is not provably gone.
    if await asyncio.to_thread(find_vm, pve, finding.vmid) is not None:
        raise NotRepaired(f"VMID {finding.vmid} is on PVE again")
    changed = await asyncio.to_thread(_set_deleted, engine, finding, True, "marked deleted")
    return "marked deleted" if changed else "already marked deleted"


async def count_again(finding: Finding, pve: PveClient, engine: Engine) -> str:
    assert finding.vmid is not None
    if await _carries(pve, finding.vmid, finding.task_id) is None:
        raise NotRepaired("the VM is gone again")
    changed = await asyncio.to_thread(_set_deleted, engine, finding, False, "counted again")
    return "counted again" if changed else "already counted"


def _settle_deletion(engine: Engine, finding: Finding, gone: bool, action: str) -> bool:
    """End what the finding's deletion left half done, with its audit row in the same transaction: the VM gone,
    its record is marked deleted, keeping the deletion's mark as a deletion that ends well leaves it (a reset
    of that run then finds its work done); the VM still there, the mark is cleared."""
    with session(engine) as db, db.begin():
        vm = _locked_vm(db, finding.task_id)
        if vm is None:
            return False
        if vm.deleted_at is not None or vm.deleting_task_id != finding.deletion:
            return False  # finished, or taken over by a deletion begun since
        if gone:
            vm.deleted_at = utcnow()
        else:
            vm.deleting_task_id = None
        audit.add(db, finding, action, vm.username)
        return True


async def finish_deletion(finding: Finding, pve: PveClient, temporal: Client, engine: Engine) -> str:
    assert finding.vmid is not None
    await _require_over(temporal, engine, finding.deletion)
    # As for the deletion itself: only a VMID gone altogether; one holding a VM without the marker is not.
    if await asyncio.to_thread(find_vm, pve, finding.vmid) is not None:
        raise NotRepaired(f"VMID {finding.vmid} is on PVE again")
    changed = await asyncio.to_thread(_settle_deletion, engine, finding, True, "marked deleted")
    return "marked deleted" if changed else "no longer half done"


async def clear_deletion_mark(finding: Finding, temporal: Client, engine: Engine) -> str:
    """The VM is still there: its owner (or `boxctl vm delete`) may delete it again. The repair tool does not
    start the deletion itself: a run that was terminated may have been terminated on purpose."""
    await _require_over(temporal, engine, finding.deletion)
    changed = await asyncio.to_thread(_settle_deletion, engine, finding, False, "mark cleared")
    return "mark cleared, it may be deleted again" if changed else "no longer marked"


async def free_clone_slot(finding: Finding, temporal: Client, engine: Engine, settings: Settings) -> str:
    """Free the slot and hand it on as a run freeing its own slot does (db.clone_slots.release_and_hand_over):
    the runs it goes to are told at once, and one that has ended meanwhile has its slot freed in turn, so
    that the next in line gets it. A run that cannot be told and is not known to be over (Temporal does not
    know it: a wrong namespace, say) keeps the slot it was given, and finds it at its next look."""
    await _require_over(temporal, engine, finding.task_id, success_too=True)
    untold: list[str] = []

    async def tell(receiver: str) -> bool:
        try:
            if await tell_slot_granted(temporal, receiver):
                return True
        except RPCError:  # Temporal did not take the signal
            pass
        if await run_is_over(temporal, engine, receiver, success_too=True) is not None:
            return False
        untold.append(receiver)
        return True

    limits = clone_slots.Limits(settings.clone_limit_per_node, settings.clone_limit_per_storage)
    handed = await clone_slots.release_and_hand_over(engine, finding.task_id, limits, tell)
    told = [receiver for receiver in handed if receiver not in untold]
    handover = (f", handed to {', '.join(told)}" if told else "") + (
        f", handed to {', '.join(untold)} (not told: it looks again within minutes)" if untold else ""
    )
    # db.clone_slots frees the slot in transactions of its own: the audit row follows at once.
    detail = f"{finding.reason}{handover}"
    return await asyncio.to_thread(audit.write, engine, finding, "freed", detail) + handover


async def repair(drift: Drift, pve: PveClient, temporal: Client, engine: Engine, settings: Settings) -> None:
    """Repair every finding of `drift`, one by one, recording on each what was done or why not. Does nothing
    at all if the drift holds a refusal."""
    if drift.refusals:
        return
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
            elif finding.kind is Kind.UNFINISHED_DELETION:
                finding.repaired = await finish_deletion(finding, pve, temporal, engine)
            elif finding.kind is Kind.STALE_DELETION_MARK:
                finding.repaired = await clear_deletion_mark(finding, temporal, engine)
            else:
                finding.repaired = await count_again(finding, pve, engine)
        except NotRepaired as exc:
            finding.failed = str(exc)
        except (PveError, PveUnavailable) as exc:
            finding.failed = f"PVE: {exc}"
        except SQLAlchemyError as exc:
            finding.failed = f"database: {exc}"
