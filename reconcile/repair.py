"""Repairing the drift: each repair checks its finding again just before it acts, and never touches a VM
that does not carry the finding's task marker (pve.ownership's rule)."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from temporalio.client import Client
from temporalio.service import RPCError

from db import clone_slots, quota
from db.engine import session
from db.models import Vm, utcnow
from pve.client import PveClient, PveError, PveUnavailable
from pve.ownership import is_owned_by
from pve.vms import find_vm, stop_and_destroy, vm_config
from reconcile.drift import Drift, Finding, Kind, VmRecord
from reconcile.observe import as_record, workflow_state
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


async def _not_running(temporal: Client, task_id: str) -> None:
    state = await workflow_state(temporal, task_id)
    if state.running:
        raise NotRepaired("its workflow is running now")
    if not state.known:
        raise NotRepaired(f"cannot tell whether its workflow is running ({state.error})")


def _record_of(engine: Engine, task_id: str) -> VmRecord | None:
    with session(engine) as db:
        vm = db.get(Vm, task_id)
        return as_record(vm) if vm is not None else None


async def destroy_orphan(finding: Finding, pve: PveClient, temporal: Client, engine: Engine) -> str:
    assert finding.vmid is not None
    await _not_running(temporal, finding.task_id)
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


async def mark_deleted(finding: Finding, pve: PveClient, engine: Engine) -> str:
    assert finding.vmid is not None
    if await _carries(pve, finding.vmid, finding.task_id) is not None:
        raise NotRepaired("the VM is on PVE again")
    changed = await asyncio.to_thread(_set_deleted, engine, finding.task_id, True)
    return "marked deleted" if changed else "already marked deleted"


async def count_again(finding: Finding, pve: PveClient, engine: Engine) -> str:
    assert finding.vmid is not None
    if await _carries(pve, finding.vmid, finding.task_id) is None:
        raise NotRepaired("the VM is gone again")
    changed = await asyncio.to_thread(_set_deleted, engine, finding.task_id, False)
    return "counted again" if changed else "already counted"


async def free_clone_slot(finding: Finding, temporal: Client, engine: Engine, settings: Settings) -> str:
    """Free the slot and hand it on as a run freeing its own slot does (db.clone_slots.release_and_hand_over):
    the runs it goes to are told at once, and one that has ended meanwhile has its slot freed in turn, so
    that the next in line gets it."""
    await _not_running(temporal, finding.task_id)
    untold: list[str] = []

    async def tell(receiver: str) -> bool:
        try:
            return await tell_slot_granted(temporal, receiver)
        except RPCError:  # Temporal did not take the signal: the run keeps its slot and finds it at its next look
            untold.append(receiver)
            return True

    limits = clone_slots.Limits(settings.clone_limit_per_node, settings.clone_limit_per_storage)
    handed = await clone_slots.release_and_hand_over(engine, finding.task_id, limits, tell)
    told = [receiver for receiver in handed if receiver not in untold]
    return (
        "freed"
        + (f", handed to {', '.join(told)}" if told else "")
        + (f", handed to {', '.join(untold)} (not told: it looks again within minutes)" if untold else "")
    )


async def repair(drift: Drift, pve: PveClient, temporal: Client, engine: Engine, settings: Settings) -> None:
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
        except (PveError, PveUnavailable) as exc:
            finding.failed = f"PVE: {exc}"
        except SQLAlchemyError as exc:
            finding.failed = f"database: {exc}"
