"""Clone slots: how many full clones run at once per node and per storage, with a first-come queue of the
creations waiting for one. A freed slot is handed to the oldest waiter that fits, in the same transaction,
so that a waiting run can sleep until it is told instead of asking again and again. Atomic across workers
and API processes (BEGIN IMMEDIATE on SQLite, a transaction-scoped advisory lock on PostgreSQL)."""

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, func, text
from sqlmodel import Session, col, select

from db.engine import session
from db.models import CloneGrant, CloneSlot, CloneWaiter
from payloads import CloneSlotRequest

# Any constant: the advisory lock that serialises slot changes on PostgreSQL.
ADVISORY_LOCK_KEY = 0x0B0C5107


class Limits:
    def __init__(self, per_node: int, per_storage: int):
        self.per_node = per_node
        self.per_storage = per_storage

    def fit(self, db: Session, node: str, storage: str) -> bool:
        """True if one more clone fits on the node and the storage (0: no limit)."""
        if self.per_node and _count(db, CloneSlot.node == node) >= self.per_node:
            return False
        return not (self.per_storage and _count(db, CloneSlot.storage == storage) >= self.per_storage)


def acquire(engine: Engine, req: CloneSlotRequest, per_node: int, per_storage: int) -> bool:
    """Take a slot for req.task_id if one is free, else queue the task (once). True if the task holds a slot,
    perhaps handed over earlier. A newcomer cannot overtake the queue: a release hands freed capacity to the
    waiters at once, so there is none left over while someone who fits is waiting."""
    limits = Limits(per_node, per_storage)
    with _locked(engine) as db:
        if db.get(CloneSlot, req.task_id) is not None:
            _forget_grant(db, req.task_id)  # the slot it was handed is taken up: no need to tell it again
            return True
        queued = db.get(CloneWaiter, req.task_id)
        if limits.fit(db, req.node, req.storage):
            if queued is not None:
                db.delete(queued)
            db.add(CloneSlot(task_id=req.task_id, node=req.node, storage=req.storage))
            return True
        if queued is None:
            db.add(CloneWaiter(task_id=req.task_id, node=req.node, storage=req.storage))
        return False


def release(engine: Engine, task_id: str, per_node: int, per_storage: int) -> list[str]:
    """Give up the task's slot (and its place in the queue); hand the freed capacity to the oldest waiters
    that fit. Returns the task ids this task has handed a slot to and that have not taken it up yet, to be
    told so: a repeat of the release (a local activity runs again when a worker died before its answer was
    recorded) names them again."""
    limits = Limits(per_node, per_storage)
    with _locked(engine) as db:
        for row in (db.get(CloneSlot, task_id), db.get(CloneWaiter, task_id)):
            if row is not None:
                db.delete(row)
        _forget_grant(db, task_id)
        db.flush()
        granted = list(
            db.exec(
                select(CloneGrant.task_id)
                .where(CloneGrant.granted_by == task_id)
                .order_by(col(CloneGrant.granted_at), col(CloneGrant.task_id))
            ).all()
        )
        for waiter in db.exec(select(CloneWaiter).order_by(col(CloneWaiter.queued_at))).all():
            if limits.fit(db, waiter.node, waiter.storage):
                db.delete(waiter)
                db.add(CloneSlot(task_id=waiter.task_id, node=waiter.node, storage=waiter.storage))
                db.add(CloneGrant(task_id=waiter.task_id, granted_by=task_id))
                db.flush()
                granted.append(waiter.task_id)
        return granted


def _forget_grant(db: Session, task_id: str) -> None:
    grant = db.get(CloneGrant, task_id)
    if grant is not None:
        db.delete(grant)


@contextmanager
def _locked(engine: Engine) -> Iterator[Session]:
    """A write transaction that holds the slot lock."""
    with session(engine) as db, db.begin():
        if engine.dialect.name == "postgresql":
            db.exec(text(f"SELECT pg_advisory_xact_lock({ADVISORY_LOCK_KEY})"))  # type: ignore[call-overload]
        yield db


def _count(db: Session, condition) -> int:  # type: ignore[no-untyped-def]
    return int(db.exec(select(func.count()).select_from(CloneSlot).where(condition)).one())
