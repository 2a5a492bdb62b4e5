"""Clone slots: how many full clones run at once per node and per storage, with a first-come queue of the
creations waiting for one. A freed slot is handed to the oldest waiter that fits, in the same transaction,
so that a waiting run can sleep until it is told instead of asking again and again. Atomic across workers
and API processes (BEGIN IMMEDIATE on SQLite, a transaction-scoped advisory lock on PostgreSQL).

`release_and_hand_over` is the one way to free a slot and tell its receivers: the workflow's
`release_clone_slot` activity and the repair tool both use it."""

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import Engine, and_, func, or_, text
from sqlmodel import Session, col, select

from db.engine import session
from db.models import CloneGrant, CloneSlot, CloneWaiter

log = logging.getLogger(__name__)

# Any constant: the advisory lock that serialises slot changes on PostgreSQL.
ADVISORY_LOCK_KEY = 0x0B0C5107


@dataclass(frozen=True)
class Limits:
    """Full clones at once per node and per storage (CLONE_LIMIT_PER_NODE, CLONE_LIMIT_PER_STORAGE); 0: none."""

    per_node: int
    per_storage: int

    def fit(self, db: Session, node: str, storage: str) -> bool:
        """True if one more clone fits on the node and the storage (0: no limit)."""
        if self.per_node and _count(db, CloneSlot.node == node) >= self.per_node:
            return False
        return not (self.per_storage and _count(db, CloneSlot.storage == storage) >= self.per_storage)


def acquire(engine: Engine, task_id: str, node: str, storage: str, limits: Limits) -> bool:
    """Take a slot for task_id's clone (from `node`, the template's, onto `storage`) if one is free, else queue
    the task (once). True if the task holds a slot, perhaps handed over earlier. A newcomer cannot overtake
    the queue: a release hands freed capacity to the waiters at once, so there is none left over while
    someone who fits is waiting."""
    with _locked(engine) as db:
        if db.get(CloneSlot, task_id) is not None:
            _forget_grant(db, task_id)  # the slot it was handed is taken up: no need to tell it again
            return True
        queued = db.get(CloneWaiter, task_id)
        if limits.fit(db, node, storage):
            if queued is not None:
                db.delete(queued)
            db.add(CloneSlot(task_id=task_id, node=node, storage=storage))
            return True
        if queued is None:
            db.add(CloneWaiter(task_id=task_id, node=node, storage=storage))
        return False


def place_in_line(engine: Engine, task_id: str) -> int:
    """The task's place in the queue (1: next), counting the waiters queued before it for the same node or the
    same storage; 0 if it is not queued. For operators: a waiting run shows it in its current details."""
    with session(engine) as db:
        me = db.get(CloneWaiter, task_id)
        if me is None:
            return 0
        ahead = db.exec(
            select(func.count())
            .select_from(CloneWaiter)
            .where(
                or_(col(CloneWaiter.node) == me.node, col(CloneWaiter.storage) == me.storage),
                or_(
                    col(CloneWaiter.queued_at) < me.queued_at,
                    and_(col(CloneWaiter.queued_at) == me.queued_at, col(CloneWaiter.task_id) < me.task_id),
                ),
            )
        ).one()
        return int(ahead) + 1


def release(engine: Engine, task_id: str, limits: Limits) -> list[str]:
    """Give up the task's slot (and its place in the queue); hand the freed capacity to the oldest waiters
    that fit. Returns the task ids this task has handed a slot to and that have not taken it up yet, to be
    told so: a repeat of the release (a local activity runs again when a worker died before its answer was
    recorded) names them again. Callers that tell runs use `release_and_hand_over`."""
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


async def release_and_hand_over(
    engine: Engine, task_id: str, limits: Limits, tell: Callable[[str], Awaitable[bool]]
) -> list[str]:
    """Free task_id's clone slot and tell each run the freed capacity went to; returns the runs told.

    `tell(receiver)` tells one run that it holds a slot now (the workflow's tell signals
    `CreateFromBoxWorkflow.clone_slot_granted`: `workflows.clone_turns.tell_slot_granted`) and returns False
    if that run has ended: it cannot use the slot, so its slot is freed in turn and handed on down the line.
    Safe to call again, for instance after `tell` raised: the release is idempotent and a repeat tells the
    same receivers again (those that have not taken their slot up yet). A receiver told twice only looks at
    its slot once more; one never told looks at the queue on its own within minutes (the workflow's
    SLOT_RECHECK)."""
    told: list[str] = []
    to_free = [task_id]
    while to_free:
        for receiver in await asyncio.to_thread(release, engine, to_free.pop(), limits):
            if await tell(receiver):
                told.append(receiver)
            else:
                log.warning("run %s has ended; freeing the clone slot it was given", receiver)
                to_free.append(receiver)
    return told


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
