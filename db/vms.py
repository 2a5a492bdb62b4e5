"""The service's VM records: a user's VMs as GET vms lists them, and the record's side of a deletion (under way,
done, given up, or forgotten by an operator). Every change that frees quota takes the owner's lock first
(db.quota.lock_user), as every change to what counts against a plan does."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, and_, func, or_
from sqlmodel import Session, col, select

from db.engine import reader, session
from db.models import COMMITTED, HELD, Reservation, Vm, utcnow
from db.quota import lock_user
from payloads import MSG_VM_BEING_CREATED, MSG_VM_NOT_FOUND


class NotDeletable(Exception):
    """The VMID is not one of the user's VMs (404), or is one still being created (409)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class UnknownVm(Exception):
    """An operator named a VMID that no VM record (not deleted) holds, or that several hold."""


@dataclass(frozen=True)
class VmRecord:
    task_id: str  # the creation's
    username: str
    vmid: int
    node: str
    name: str
    cores: int
    memory_mb: int
    disk_gb: int
    box_id: str | None
    storage: str | None
    created_at: datetime
    ip_addresses: list[str]
    deleting_task_id: str | None
    deleted: bool

    @property
    def deleting(self) -> bool:
        return self.deleting_task_id is not None and not self.deleted


def _record(vm: Vm) -> VmRecord:
    return VmRecord(
        task_id=vm.task_id,
        username=vm.username,
        vmid=vm.vmid,
        node=vm.node,
        name=vm.name,
        cores=vm.cores,
        memory_mb=vm.memory_mb,
        disk_gb=vm.disk_gb,
        box_id=vm.box_id,
        storage=vm.storage,
        created_at=vm.created_at,
        ip_addresses=list(vm.ip_addresses or []),
        deleting_task_id=vm.deleting_task_id,
        deleted=vm.deleted_at is not None,
    )


def _live(db: Session, vmid: int, username: str | None = None) -> list[Vm]:
    query = select(Vm).where(Vm.vmid == vmid, col(Vm.deleted_at).is_(None))
    if username is not None:
        query = query.where(Vm.username == username)
    return list(db.exec(query.order_by(col(Vm.created_at).desc())).all())


def _refusal(db: Session, username: str, vmid: int) -> NotDeletable:
    """Why the user has no VM `vmid`: its creation still runs (the record is written as its
    last step), or none."""
    creating = db.exec(
        select(Reservation.task_id).where(
            Reservation.username == username, Reservation.vmid == vmid, Reservation.state == HELD
        )
    ).first()
    if creating is not None:
        return NotDeletable(409, MSG_VM_BEING_CREATED)
    return NotDeletable(404, MSG_VM_NOT_FOUND)


def deletable(engine: Engine, username: str, vmid: int) -> VmRecord:
    """The user's VM `vmid`, not deleted; NotDeletable otherwise (someone else's VMs are the same 404)."""
    with session(engine) as db:
        live = _live(db, vmid, username)
        if not live:
            raise _refusal(db, username, vmid)
        return _record(live[0])


def begin_deletion(engine: Engine, username: str, vmid: int, task_id: str) -> VmRecord:
    """Mark the user's VM `vmid` as being deleted by `task_id`, and return it. A VM this very task already
    deleted is returned as it is (`deleted`): a repeat of a deletion that succeeded. A deletion of another id
    under way is taken over: each acts only on the VM that carries the creation's marker, so two at once
    end the same way."""
    with session(engine) as db, db.begin():
        lock_user(db, username)
        live = _live(db, vmid, username)
        if live:
            live[0].deleting_task_id = task_id
            return _record(live[0])
        done = db.exec(select(Vm).where(Vm.username == username, Vm.deleting_task_id == task_id)).first()
        if done is not None and done.vmid == vmid:
            return _record(done)
        raise _refusal(db, username, vmid)


def finish_deletion(engine: Engine, creation_task_id: str) -> bool:
    """Mark the VM deleted, so it no longer counts against its owner's plan; True if this call did."""
    with session(engine) as db, db.begin():
        vm = db.get(Vm, creation_task_id)
        if vm is None or vm.deleted_at is not None:
            return False
        lock_user(db, vm.username)
        db.refresh(vm)  # as it is now that nothing else can change it
        if vm.deleted_at is not None:
            return False
        vm.deleted_at = utcnow()
        return True


def abandon_deletion(engine: Engine, creation_task_id: str, task_id: str) -> None:
    """The deletion `task_id` ended without deleting the VM: it is no longer being deleted (unless another
    deletion took it over meanwhile)."""
    with session(engine) as db, db.begin():
        vm = db.get(Vm, creation_task_id)
        if vm is not None and vm.deleted_at is None and vm.deleting_task_id == task_id:
            vm.deleting_task_id = None


def live_vm(engine: Engine, vmid: int) -> VmRecord:
    """Any user's VM `vmid`, not deleted, for an operator; UnknownVm if there is none, or more than one."""
    with session(engine) as db:
        return _record(_the_one(_live(db, vmid), vmid))


def forget(engine: Engine, vmid: int) -> VmRecord:
    """Mark any user's VM `vmid` deleted without looking at PVE (a VM gone, or its VMID reused, outside the
    service): it stops counting against its owner's plan. Returns the record as it was."""
    with session(engine) as db, db.begin():
        vm = _the_one(_live(db, vmid), vmid)
        lock_user(db, vm.username)
        db.refresh(vm)
        record = _record(vm)
        if vm.deleted_at is None:
            vm.deleted_at = utcnow()
        return record


def _the_one(live: list[Vm], vmid: int) -> Vm:
    if not live:
        raise UnknownVm(f"no VM record holds VMID {vmid} (or it is deleted already)")
    if len(live) > 1:
        # Two records claim one VMID: `boxctl reconcile` tells which is on PVE; acting on a guess would not do.
        tasks = ", ".join(vm.task_id for vm in live)
        raise UnknownVm(f"several VM records hold VMID {vmid} ({tasks}); run `boxctl reconcile` first")
    return live[0]


# A position in a user's listing, newest first: the last record's creation time and task id.
Cursor = tuple[datetime, str]


def page_of_vms(
    engine: Engine, username: str, limit: int, after: Cursor | None
) -> tuple[list[VmRecord], Cursor | None]:
    """The user's VMs not deleted, newest first: `limit` of them after `after`, and the cursor of the next page
    (None on the last). Keyset paging: a VM created or deleted meanwhile moves no other across a page edge."""
    query = select(Vm).where(Vm.username == username, col(Vm.deleted_at).is_(None))
    if after is not None:
        created_at, task_id = after
        query = query.where(
            or_(col(Vm.created_at) < created_at, and_(col(Vm.created_at) == created_at, col(Vm.task_id) < task_id))
        )
    query = query.order_by(col(Vm.created_at).desc(), col(Vm.task_id).desc()).limit(limit + 1)
    with session(engine) as db:
        rows = list(db.exec(query).all())
    page = [_record(vm) for vm in rows[:limit]]
    more = len(rows) > limit
    return page, ((page[-1].created_at, page[-1].task_id) if more else None)


def made_by(engine: Engine, task_ids: list[str]) -> Vm | None:
    """The record of the VM that the first of these creations to make one made and kept: live, or deleted by its
    owner since (its reservation stays committed). Not one that the creation's own undo took back (its VM
    destroyed, its reservation released, and held again by a reset's admission since)."""
    committed = func.coalesce(col(Reservation.state), COMMITTED.value) == COMMITTED.value  # none: as committed
    kept = and_(col(Vm.task_id).in_(task_ids), or_(col(Vm.deleted_at).is_(None), committed))
    query = select(Vm).join(Reservation, col(Reservation.task_id) == col(Vm.task_id), isouter=True).where(kept)
    with session(reader(engine)) as db:
        rows = {vm.task_id: vm for vm in db.exec(query).all()}
    return next((rows[task_id] for task_id in task_ids if task_id in rows), None)
