"""Admission against a compute resource plan: check the limits and reserve, atomically, keyed by task id.

Every function here is idempotent for its task id, because Temporal may run an activity more than once.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field

from sqlalchemy import Engine, func, text, union
from sqlmodel import Session, col, select

from db.engine import session
from db.models import COMMITTED, HELD, RELEASED, Plan, Reservation, User, Vm, utcnow
from payloads import MSG_PER_VM_LIMIT, MSG_PLAN_NOT_FOUND, MSG_TOTAL_LIMIT, Failure


class Refused(Exception):
    """A request the plan does not admit; permanent."""

    def __init__(self, failure: Failure, message: str):
        super().__init__(message)
        self.failure = failure
        self.message = message


class NoFreeVmid(Exception):
    """Every candidate VMID is held by another live creation; transient (look at PVE again)."""


@dataclass(frozen=True)
class Size:
    """What one VM takes from its owner's plan."""

    cores: int
    memory_mb: int
    disk_gb: int


@dataclass(frozen=True)
class CreatedVm:
    """A VM the service has made, to be recorded against its owner's plan."""

    task_id: str
    username: str
    vmid: int
    node: str
    name: str
    size: Size
    box_id: str | None = None
    storage: str | None = None
    ip_addresses: list[str] = field(default_factory=list)  # what its guest agent reported


@dataclass
class Usage:
    cores: int = 0
    memory_mb: int = 0
    disk_gb: int = 0
    vms: int = 0


def usage_of(db, username: str) -> Usage:  # type: ignore[no-untyped-def]
    """What counts against the user's totals: live VMs the service created, plus creations in flight."""
    usage = Usage()
    vm_sums = db.exec(
        select(func.count(), func.sum(Vm.cores), func.sum(Vm.memory_mb), func.sum(Vm.disk_gb)).where(
            Vm.username == username, col(Vm.deleted_at).is_(None)
        )
    ).one()
    held_sums = db.exec(
        select(
            func.count(),
            func.sum(Reservation.cores),
            func.sum(Reservation.memory_mb),
            func.sum(Reservation.disk_gb),
        ).where(Reservation.username == username, Reservation.state == HELD)
    ).one()
    for count, cores, memory, disk in (vm_sums, held_sums):
        usage.vms += count or 0
        usage.cores += cores or 0
        usage.memory_mb += memory or 0
        usage.disk_gb += disk or 0
    return usage


# Any constant: the advisory lock that serialises VMID choice across users on PostgreSQL (the user row lock
# alone would let two users' creations pick the same lowest free VMID).
VMID_LOCK_KEY = 0x0B0C5108


def _lock_vmids(db) -> None:  # type: ignore[no-untyped-def]
    if db.get_bind().dialect.name == "postgresql":
        db.exec(text(f"SELECT pg_advisory_xact_lock({VMID_LOCK_KEY})"))


def lock_user(db, username: str) -> User | None:  # type: ignore[no-untyped-def]
    """Every transaction that changes what counts against a user's plan takes this lock first, so the admission
    check (which holds it) never reads a change half made: PostgreSQL's READ COMMITTED gives each statement its
    own snapshot, and a commit landing between the reads of VMs and of held reservations would count that
    creation in neither. On SQLite, BEGIN IMMEDIATE serialises these transactions already."""
    return db.exec(select(User).where(User.username == username).with_for_update()).first()


# Given-out VMIDs read at first while looking for a free one, doubled at each further read.
VMID_BATCH = 64


def pick_vmid(db, free_ranges: list[list[int]]) -> int:  # type: ignore[no-untyped-def]
    """The lowest VMID that PVE showed free and that the service has not given out: neither held by a live
    creation (not on PVE yet) nor one of its VMs (PVE's answer may be a moment old). Reads only the given-out
    VMIDs from the candidate up (few: PVE's free ranges hold none of the VMs it has), not every VM's."""
    for first, last in free_ranges:
        vmid, batch = first, VMID_BATCH
        while vmid <= last:
            given_out = _given_out(db, vmid, last, batch)
            for given in given_out:
                if given > vmid:
                    return vmid
                vmid = given + 1
            if len(given_out) < batch and vmid <= last:
                return vmid
            batch *= 2  # as many creations in flight as this: read them in a few statements, not one per 64
    raise NoFreeVmid("every VMID PVE showed free is held by another creation")


def _given_out(db, first: int, last: int, limit: int) -> list[int]:  # type: ignore[no-untyped-def]
    """The first `limit` VMIDs from `first` to `last` held by a live creation or one of the service's VMs, in
    order. One statement, so one snapshot: a commit moving a creation from held to a VM record lands in one of
    its two halves (and the VMID lock keeps other creations from taking any meanwhile)."""
    given_out = union(
        select(Reservation.vmid).where(Reservation.state == HELD, col(Reservation.vmid).between(first, last)),
        select(Vm.vmid).where(col(Vm.deleted_at).is_(None), col(Vm.vmid).between(first, last)),
    ).subquery()
    return list(db.exec(select(given_out.c.vmid).order_by(given_out.c.vmid).limit(limit)).all())


def reserve(engine: Engine, task_id: str, username: str, size: Size, free_ranges: list[list[int]]) -> int:
    """Check the plan and hold the quota and a VMID (the lowest free one in `free_ranges`, inclusive
    [first, last] ranges from PVE) for task_id; returns the VMID."""
    with session(engine) as db, db.begin():
        return reserve_in(db, task_id, username, size, free_ranges)


def reserve_in(db: Session, task_id: str, username: str, size: Size, free_ranges: list[list[int]]) -> int:
    """`reserve` inside the caller's write transaction (admission takes the clone slot in the same one)."""
    user = lock_user(db, username)  # first: one user's slow transaction holds up only that user
    existing = db.get(Reservation, task_id)
    if existing is not None and existing.state != RELEASED and existing.vmid is not None:
        return existing.vmid  # a retry of a reservation made (or committed) already
    _check_plan(db, user, username, size, count=1)
    # The lock every user's creations share, taken last: a retry and a refusal never wait for it. It is held
    # until the commit: for the VMID pick and the insert, and, in admission's transaction, for the clone slot
    # after them (whose lock it may wait for behind a slot's release; no transaction takes the two the other
    # way round).
    _lock_vmids(db)
    vmid = pick_vmid(db, free_ranges)
    if existing is not None:
        # Released by a cleanup, and now the run goes on again (reset from the Web UI): hold it anew.
        db.delete(existing)
        db.flush()
    db.add(_held(task_id, username, size, vmid))
    return vmid


def reserve_all(
    engine: Engine,
    task_ids: list[str],
    username: str,
    size: Size,
    free_ranges: list[list[int]],
    retries: Mapping[str, str] | None = None,
) -> list[int]:
    """A lab's admission: hold the quota and a VMID for each of `task_ids` (VMs of one size), all or nothing,
    in one transaction; every VM is checked against the per-VM limits and their sum against the totals.
    Returns the VMIDs in the order of `task_ids`. A repeat (the activity ran again) returns the same VMIDs.
    `retries` maps a task id to the one its VM is tried again under: a VM whose retry holds quota or made it
    (a lab reset after that) counts under the retry's id alone, with its VMID, and nothing more is held."""
    retries = retries or {}
    with session(engine) as db, db.begin():
        user = lock_user(db, username)
        asked = [*task_ids, *(retries[t] for t in task_ids if t in retries)]
        rows = db.exec(select(Reservation).where(col(Reservation.task_id).in_(asked))).all()
        live = {r.task_id: r.vmid for r in rows if r.state != RELEASED and r.vmid is not None}
        vmids = {t: live.get(t, live.get(retries.get(t, ""))) for t in task_ids}
        missing = [task_id for task_id in task_ids if vmids[task_id] is None]
        if missing:
            # Those held already (a repeat) count in the usage; the rest are checked and held now.
            _check_plan(db, user, username, size, count=len(missing))
            for released in (r for r in rows if r.task_id in missing):
                db.delete(released)  # released by a cleanup, and the lab runs again (reset): held anew
            db.flush()
            _lock_vmids(db)
            for task_id in missing:
                vmid = vmids[task_id] = pick_vmid(db, free_ranges)
                db.add(_held(task_id, username, size, vmid))
                db.flush()  # the next pick sees this VMID as given out
        return [vmids[task_id] for task_id in task_ids]  # type: ignore[misc]


def _check_plan(db, user: User | None, username: str, size: Size, count: int) -> None:  # type: ignore[no-untyped-def]
    """Refused unless `count` VMs of `size` fit the user's plan: each within the per-VM limits, all of them
    with what the user has and has in flight within the totals (the seed's order: plan, per VM, totals)."""
    plan = db.get(Plan, user.plan_id) if user is not None and user.plan_id else None
    if plan is None:
        raise Refused(Failure.PLAN_NOT_FOUND, MSG_PLAN_NOT_FOUND)
    if size.cores > plan.per_vm_cores or size.memory_mb > plan.per_vm_memory_mb or size.disk_gb > plan.per_vm_disk_gb:
        raise Refused(Failure.PER_VM_LIMIT, MSG_PER_VM_LIMIT)
    used = usage_of(db, username)
    if (
        used.cores + count * size.cores > plan.total_cores
        or used.memory_mb + count * size.memory_mb > plan.total_memory_mb
        or used.disk_gb + count * size.disk_gb > plan.total_disk_gb
        or (plan.total_vms is not None and used.vms + count > plan.total_vms)
    ):
        raise Refused(Failure.TOTAL_LIMIT, MSG_TOTAL_LIMIT)


def _held(task_id: str, username: str, size: Size, vmid: int) -> Reservation:
    return Reservation(
        task_id=task_id,
        username=username,
        cores=size.cores,
        memory_mb=size.memory_mb,
        disk_gb=size.disk_gb,
        vmid=vmid,
    )


def reassign_vmid(engine: Engine, task_id: str, free_ranges: list[list[int]]) -> int:
    """Move the task's held reservation to another VMID (its own was taken outside the service)."""
    with session(engine) as db, db.begin():
        _lock_vmids(db)
        reservation = db.get(Reservation, task_id)
        if reservation is None or reservation.state != HELD:
            raise Refused(Failure.CLONE_FAILED, "the task holds no reservation")
        vmid = pick_vmid(db, free_ranges)
        reservation.vmid = vmid
        reservation.updated_at = utcnow()
        return vmid


def commit(engine: Engine, vm: CreatedVm, unless_given_back: bool = False) -> bool:
    """Record the created VM and turn its reservation into usage, once; True if it is recorded.

    `unless_given_back`: record nothing (False) if the creation's quota was given back, which only its undo does
    (undo_creation), or is held for another VMID (the run was reset and admitted anew since). For a record
    written by an activity that the run may have stopped waiting for (cancelled): the run's undo then comes
    first or second, never half (both hold the user's lock), and either way leaves no record of a VM it
    destroyed."""
    with session(engine) as db, db.begin():
        lock_user(db, vm.username)
        if unless_given_back:
            held = db.get(Reservation, vm.task_id)
            if held is None or held.state == RELEASED or held.vmid != vm.vmid:
                return False
        if db.get(Vm, vm.task_id) is None:
            db.add(
                Vm(
                    task_id=vm.task_id,
                    username=vm.username,
                    vmid=vm.vmid,
                    node=vm.node,
                    name=vm.name,
                    cores=vm.size.cores,
                    memory_mb=vm.size.memory_mb,
                    disk_gb=vm.size.disk_gb,
                    box_id=vm.box_id,
                    storage=vm.storage,
                    ip_addresses=list(vm.ip_addresses),
                )
            )
        reservation = db.get(Reservation, vm.task_id)
        if reservation is not None and reservation.state != COMMITTED:
            reservation.state = COMMITTED
            reservation.updated_at = utcnow()
        return True


def release(engine: Engine, task_id: str) -> bool:
    """Give back the quota held for task_id; True if this call released it."""
    with session(engine) as db, db.begin():
        reservation = db.get(Reservation, task_id)
        if reservation is None or reservation.state != HELD:
            return False
        lock_user(db, reservation.username)
        db.refresh(reservation)  # as it is now that nothing else can change it
        if reservation.state != HELD:
            return False
        reservation.state = RELEASED
        reservation.updated_at = utcnow()
        return True


def undo_creation(engine: Engine, task_id: str) -> bool:
    """A creation's undo, after its VM is destroyed (or never made): give back the quota held for task_id, or,
    if the creation was recorded already, take the record back too (marked deleted, its reservation released).
    The record can be there although the run never saw it written: the workflow task that ran the record's
    local activity failed (a cancellation came in as it completed) and the run, replayed, was cancelled before
    that step. True if this call changed anything."""
    with session(engine) as db, db.begin():
        reservation = db.get(Reservation, task_id)
        if reservation is None or reservation.state == RELEASED:
            return False
        lock_user(db, reservation.username)
        db.refresh(reservation)  # as it is now that nothing else can change it
        if reservation.state == RELEASED:
            return False
        record = db.get(Vm, task_id)
        if record is not None and record.deleted_at is None:
            record.deleted_at = utcnow()
        reservation.state = RELEASED
        reservation.updated_at = utcnow()
        return True


def usage_of_user(engine: Engine, username: str) -> Usage:
    with session(engine) as db:
        return usage_of(db, username)
