"""Admission against a compute resource plan: check the limits and reserve, atomically, keyed by task id.

Every function here is idempotent for its task id, because Temporal may run an activity more than once.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, Row, bindparam, delete, func, insert, select, union_all, update
from sqlmodel import Session

from db.engine import session, table_of
from db.models import COMMITTED, HELD, RELEASED, Plan, Reservation, User, Vm, utcnow
from db.vmids import lock_vmids, pick_vmid
from payloads import MSG_PER_VM_LIMIT, MSG_PLAN_NOT_FOUND, MSG_TOTAL_LIMIT, Failure


class Refused(Exception):
    """A request the plan does not admit; permanent."""

    def __init__(self, failure: Failure, message: str):
        super().__init__(message)
        self.failure = failure
        self.message = message


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
    """What counts against the user's totals: live VMs the service created, plus creations in flight. One
    statement, so one snapshot (on PostgreSQL each statement of a transaction may see a later commit)."""
    usage = Usage()
    for count, cores, memory, disk in db.execute(_USAGE, {"username": username}).all():
        usage.vms += count or 0
        usage.cores += cores or 0
        usage.memory_mb += memory or 0
        usage.disk_gb += disk or 0
    return usage


# The statements on a creation's path are Core statements on the tables, built once (see db.engine.table_of).
_users, _plans, _reservations, _vms = table_of(User), table_of(Plan), table_of(Reservation), table_of(Vm)
_USAGE = union_all(
    select(func.count(), func.sum(_vms.c.cores), func.sum(_vms.c.memory_mb), func.sum(_vms.c.disk_gb)).where(
        _vms.c.username == bindparam("username"), _vms.c.deleted_at.is_(None)
    ),
    select(
        func.count(),
        func.sum(_reservations.c.cores),
        func.sum(_reservations.c.memory_mb),
        func.sum(_reservations.c.disk_gb),
    ).where(_reservations.c.username == bindparam("username"), _reservations.c.state == HELD.value),
)
_LOCK_USER = (
    select(_users.c.username, _users.c.plan_id).where(_users.c.username == bindparam("username")).with_for_update()
)
_NEW_RESERVATION = insert(_reservations)
_NEW_VM = insert(_vms)
_PLAN = select(_plans).where(_plans.c.id == bindparam("plan_id"))
_RESERVATION = select(_reservations.c.state, _reservations.c.vmid, _reservations.c.retry_task_id).where(
    _reservations.c.task_id == bindparam("task_id")
)
_SET_VMID = (
    update(_reservations)
    .where(_reservations.c.task_id == bindparam("of_task"))
    .values(vmid=bindparam("new_vmid"), updated_at=bindparam("now"))
)


# A creation run again after the VM it made was deleted (a reset of a run that had succeeded).
MSG_VM_DELETED = "This task's VM was made and has been deleted since: start a new creation instead"


def lock_user(db, username: str) -> Row[Any] | None:  # type: ignore[no-untyped-def]
    """Every transaction that changes what counts against a user's plan takes this lock first, so the admission
    check (which holds it) sees no change of that user's usage between its read and the reservation it then
    writes: two creations of one user checked at once would each fit where both do not. On SQLite, BEGIN
    IMMEDIATE serialises these transactions already. Returns the user's username and plan_id, None for no such
    user."""
    return db.execute(_LOCK_USER, {"username": username}).first()  # type: ignore[no-any-return]


def reserve(engine: Engine, task_id: str, username: str, size: Size, free_ranges: list[list[int]]) -> int:
    """Check the plan and hold the quota and a VMID (the lowest free one in `free_ranges`, inclusive
    [first, last] ranges from PVE) for task_id; returns the VMID."""
    with session(engine) as db, db.begin():
        return reserve_in(db, task_id, username, size, free_ranges)


def reserve_in(db: Session, task_id: str, username: str, size: Size, free_ranges: list[list[int]]) -> int:
    """`reserve` inside the caller's write transaction (admission takes the clone slot in the same one)."""
    user = lock_user(db, username)  # first: one user's slow transaction holds up only that user
    existing = db.execute(_RESERVATION, {"task_id": task_id}).first()
    if existing is not None and existing.state != RELEASED and existing.vmid is not None:
        if existing.state == COMMITTED and _vm_deleted(db, task_id):
            # The run made its VM, which was deleted since, and now runs again (an operator's reset): the task's
            # one VM record is that deleted VM's, so another VM would count nowhere. Made once, it is not remade.
            raise Refused(Failure.INVALID_REQUEST, MSG_VM_DELETED)
        return int(existing.vmid)  # a retry of a reservation made (or committed) already
    if existing is not None and existing.state == HELD:
        # A lab VM's retry, holding the quota its first try handed over (undo_creation): the lab was admitted
        # whole, so the plan is not asked again; only the VMID is chosen now.
        lock_vmids(db)
        vmid = pick_vmid(db, free_ranges)
        db.execute(_SET_VMID, {"of_task": task_id, "new_vmid": vmid, "now": utcnow()})
        return vmid
    retry_task_id = existing.retry_task_id if existing is not None else None
    if not (retry_task_id and _take_back(db, retry_task_id)):
        _check_plan(db, user, username, size, count=1)
    # The lock every user's creations share, taken last: a retry and a refusal never wait for it. It is held
    # until the commit: for the VMID pick and the insert, and, in admission's transaction, for the clone slot
    # after them (whose lock it may wait for behind a slot's release; no transaction takes the two the other
    # way round).
    lock_vmids(db)
    vmid = pick_vmid(db, free_ranges)
    if existing is not None:
        # Released by a cleanup, and now the run goes on again (reset from the Web UI): hold it anew.
        db.execute(delete(_reservations).where(_reservations.c.task_id == task_id))
    _hold(db, task_id, username, size, vmid, retry_task_id)
    return vmid


def _take_back(db: Session, retry_task_id: str) -> bool:
    """A lab VM's first try held anew (an operator reset the lab, or the try, after the try had handed its quota
    over to its retry, which has not been admitted): the retry gives that quota back to it, counted once."""
    retry = db.get(Reservation, retry_task_id)
    if retry is None or retry.state != HELD or retry.vmid is not None:
        return False
    retry.state, retry.updated_at = RELEASED.value, utcnow()
    db.flush()
    return True


def _vm_deleted(db: Session, task_id: str) -> bool:
    return db.execute(select(_vms.c.deleted_at).where(_vms.c.task_id == task_id)).scalar() is not None


def reserve_all(
    engine: Engine,
    task_ids: list[str],
    username: str,
    size: Size,
    free_ranges: list[list[int]],
    retries: Mapping[str, str] | None = None,
    before_commit: Callable[[], None] = lambda: None,
) -> list[int]:
    """A lab's admission: hold the quota and a VMID for each of `task_ids` (VMs of one size), all or nothing,
    in one transaction; every VM is checked against the per-VM limits and their sum against the totals.
    Returns the VMIDs in the order of `task_ids`. A repeat (the activity ran again) returns the same VMIDs.
    `retries` maps a task id to the one its VM is tried again under: a VM whose retry holds quota or made it
    (a lab reset after that) counts under the retry's id alone, with its VMID, and nothing more is held. Each
    reservation names its retry, to which its creation's undo hands the quota over (undo_creation).
    `before_commit` runs last in the transaction, its locks held: what it raises rolls everything back."""
    retries = retries or {}
    with session(engine) as db, db.begin():
        user = lock_user(db, username)
        asked = [*task_ids, *(retries[t] for t in task_ids if t in retries)]
        rows = db.execute(select(Reservation).where(_reservations.c.task_id.in_(asked))).scalars().all()
        live = {r.task_id: r.vmid for r in rows if r.state != RELEASED and r.vmid is not None}
        vmids = {t: live.get(t, live.get(retries.get(t, ""))) for t in task_ids}
        missing = [task_id for task_id in task_ids if vmids[task_id] is None]
        if missing:
            # A retry of a missing VM that holds its first try's quota but never chose a VMID (the lab was reset
            # before the retry was admitted) gives it back: the first try's id holds it again below.
            handed_over = {retries[t] for t in missing if t in retries}
            for row in rows:
                if row.task_id in handed_over and row.state == HELD and row.vmid is None:
                    row.state, row.updated_at = RELEASED.value, utcnow()
            db.flush()
            # Those held already (a repeat) count in the usage; the rest are checked and held now.
            _check_plan(db, user, username, size, count=len(missing))
            for released in (r for r in rows if r.task_id in missing):
                db.delete(released)  # released by a cleanup, and the lab runs again (reset): held anew
            db.flush()
            lock_vmids(db)
            for task_id in missing:
                vmid = vmids[task_id] = pick_vmid(db, free_ranges)
                # Written at once: the next pick sees it given out.
                _hold(db, task_id, username, size, vmid, retry_task_id=retries.get(task_id))
        before_commit()
        return [vmids[task_id] for task_id in task_ids]  # type: ignore[misc]


def _check_plan(db, user: Row[Any] | None, username: str, size: Size, count: int) -> None:  # type: ignore[no-untyped-def]
    """Refused unless `count` VMs of `size` fit the user's plan: each within the per-VM limits, all of them
    with what the user has and has in flight within the totals (the seed's order: plan, per VM, totals).
    `user`: lock_user's answer."""
    plan = db.execute(_PLAN, {"plan_id": user.plan_id}).first() if user is not None and user.plan_id else None
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


def _hold(  # type: ignore[no-untyped-def]
    db, task_id: str, username: str, size: Size, vmid: int | None, retry_task_id: str | None = None
) -> None:
    """Hold the quota of one VM of `size` and `vmid` for task_id (a new reservation row)."""
    now = utcnow()
    db.execute(
        _NEW_RESERVATION,
        dict(
            task_id=task_id,
            username=username,
            cores=size.cores,
            memory_mb=size.memory_mb,
            disk_gb=size.disk_gb,
            vmid=vmid,
            state=HELD.value,
            retry_task_id=retry_task_id,
            created_at=now,
            updated_at=now,
        ),
    )


def reassign_vmid(engine: Engine, task_id: str, free_ranges: list[list[int]]) -> int:
    """Move the task's held reservation to another VMID (its own was taken outside the service)."""
    with session(engine) as db, db.begin():
        lock_vmids(db)
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
    with engine.begin() as db:
        lock_user(db, vm.username)
        held = db.execute(_RESERVATION, {"task_id": vm.task_id}).first()
        if unless_given_back and (held is None or held.state == RELEASED or held.vmid != vm.vmid):
            return False
        record = dict(
            task_id=vm.task_id,
            username=vm.username,
            vmid=vm.vmid,
            node=vm.node,
            name=vm.name,
            cores=vm.size.cores,
            memory_mb=vm.size.memory_mb,
            disk_gb=vm.size.disk_gb,
            created_at=utcnow(),
            box_id=vm.box_id,
            storage=vm.storage,
            ip_addresses=list(vm.ip_addresses),
            deleted_at=None,
            deleting_task_id=None,
        )
        earlier = db.execute(select(_vms.c.deleted_at).where(_vms.c.task_id == vm.task_id)).first()
        if earlier is None:
            db.execute(_NEW_VM, record)
        elif earlier.deleted_at is not None and held is not None and held.state == HELD:
            # The record of a VM this creation's own undo took back (it was destroyed), and the creation, reset
            # by an operator, has made the VM again under a new hold: the record is the new VM's. (A VM its
            # owner deleted keeps a committed reservation, and a reset of its creation is refused.)
            db.execute(update(_vms).where(_vms.c.task_id == vm.task_id).values(record))
        if held is not None and held.state != COMMITTED:
            db.execute(
                update(_reservations)
                .where(_reservations.c.task_id == vm.task_id)
                .values(state=COMMITTED.value, updated_at=utcnow())
            )
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


def undo_creation(engine: Engine, task_id: str, hand_over: bool = False) -> bool:
    """A creation's undo, after its VM is destroyed (or never made): give back the quota held for task_id, or,
    if the creation was recorded already, take the record back too (marked deleted, its reservation released).
    The record can be there although the run never saw it written: the workflow task that ran the record's
    local activity failed (a cancellation came in as it completed) and the run, replayed, was cancelled before
    that step. True if this call changed anything.

    With `hand_over` (the creation failed; it was not cancelled), a lab VM's first try hands its quota over to its
    retry instead, in the same transaction (held under the retry's id, with no VMID yet): given back, another
    creation of the owner's could take it before the lab's retry is admitted, and the lab, admitted whole, would
    lose a VM to it. The lab gives back what a retry it never started holds (LabWorkflow's end)."""
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
        if hand_over and reservation.retry_task_id:
            _hand_over(db, reservation)
        return True


def _hand_over(db: Session, first: Reservation) -> None:
    """Hold `first`'s quota for its retry, unless the retry holds or has used quota of its own already."""
    retry = db.get(Reservation, first.retry_task_id)
    size = Size(first.cores, first.memory_mb, first.disk_gb)
    if retry is None:
        db.flush()  # the first try's release, before the new row's insert
        _hold(db, str(first.retry_task_id), first.username, size, vmid=None)
    elif retry.state == RELEASED:
        # Its quota given back by an earlier run of the lab (an operator's reset since): held again.
        retry.state, retry.vmid, retry.updated_at = HELD.value, None, utcnow()
        retry.cores, retry.memory_mb, retry.disk_gb = size.cores, size.memory_mb, size.disk_gb


def usage_of_user(engine: Engine, username: str) -> Usage:
    with session(engine) as db:
        return usage_of(db, username)
