"""Clone slots: how many full clones run at once per node and per storage, and the queue of the creations
waiting for one, with fair turns between owners. A freed slot goes, in the same transaction, to the waiting
owner with the fewest clones running against the waiter's node or storage (ties: the one waiting longest for a
turn on that node or storage, then the waiter queued first; see `_hand_over`), so that one user's single
creation gets the next slot before the rest of another user's lab; a waiting run can then sleep until it is
told instead of asking again and again. Atomic across workers and API processes (BEGIN
IMMEDIATE on SQLite, a transaction-scoped advisory lock on PostgreSQL).

`release_and_hand_over` is the one way to free a slot and tell its receivers: the workflow's
`release_clone_slot` activity and the repair tool both use it."""

import asyncio
import heapq
import logging
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, Row, and_, bindparam, delete, func, insert, or_, text, update
from sqlmodel import Session, col, select

from db.engine import session, table_of
from db.models import CloneGrant, CloneSlot, CloneWaiter, utcnow

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
        if self.per_node and db.execute(_ON_NODE, {"node": node}).scalar_one() >= self.per_node:
            return False
        return not (self.per_storage and db.execute(_ON_STORAGE, {"storage": storage}).scalar_one() >= self.per_storage)


def acquire(engine: Engine, task_id: str, node: str, storage: str, limits: Limits, owner: str = "") -> bool:
    """Take a slot for task_id's clone (from `node`, the template's, onto `storage`) if one is free, else queue
    the task (once) under its owner. True if the task holds a slot, perhaps handed over earlier. A newcomer
    cannot overtake the queue: a release hands freed capacity to the waiters at once, so there is none left
    over while someone who fits is waiting."""
    with session(engine) as db, db.begin():
        return acquire_in(db, task_id, node, storage, limits, owner)


def acquire_in(db: Session, task_id: str, node: str, storage: str, limits: Limits, owner: str = "") -> bool:
    """`acquire` inside the caller's write transaction (admission holds the quota and the slot in one)."""
    _lock(db)
    task = {"task_id": task_id}
    if db.execute(_SLOT_OWNER, task).first() is not None:
        db.execute(_FORGET_GRANT, task)  # the slot it was handed is taken up: no need to tell it again
        return True
    queued = db.execute(_WAITER_OF, task).first()
    if limits.fit(db, node, storage):
        if queued is not None:
            db.execute(_LEAVE_QUEUE, task)
        db.execute(_NEW_SLOT, dict(task_id=task_id, node=node, storage=storage, owner=owner, acquired_at=utcnow()))
        return True
    if queued is None:
        db.execute(_NEW_WAITER, dict(task_id=task_id, node=node, storage=storage, owner=owner, queued_at=utcnow()))
    elif owner and not queued.owner:
        # Queued before owners were kept: its place stays, its turns become fair.
        db.execute(update(_waiters).where(_waiters.c.task_id == task_id).values(owner=owner))
    return False


# What admission asks on every creation's path, as Core statements built once (see db.engine.table_of).
_slots, _waiters, _grants = table_of(CloneSlot), table_of(CloneWaiter), table_of(CloneGrant)
_SLOT_OWNER = (
    _slots.select()
    .with_only_columns(_slots.c.owner, _slots.c.node, _slots.c.storage)
    .where(_slots.c.task_id == bindparam("task_id"))
)
_WAITER_OF = _waiters.select().with_only_columns(_waiters.c.owner).where(_waiters.c.task_id == bindparam("task_id"))
_ON_NODE = _slots.select().with_only_columns(func.count()).where(_slots.c.node == bindparam("node"))
_ON_STORAGE = _slots.select().with_only_columns(func.count()).where(_slots.c.storage == bindparam("storage"))
_NEW_SLOT = insert(_slots)
_NEW_WAITER = insert(_waiters)
# And what a release and its hand-over ask (every creation frees its slot).
_FREE_SLOT = delete(_slots).where(_slots.c.task_id == bindparam("task_id"))
_LEAVE_QUEUE = delete(_waiters).where(_waiters.c.task_id == bindparam("task_id"))
_FORGET_GRANT = delete(_grants).where(_grants.c.task_id == bindparam("task_id"))
_GRANTED_BY = (
    _grants.select()
    .with_only_columns(_grants.c.task_id)
    .where(_grants.c.granted_by == bindparam("task_id"))
    .order_by(_grants.c.granted_at, _grants.c.task_id)
)
_NEW_GRANT = insert(_grants)
_RUNNING = _slots.select().with_only_columns(_slots.c.owner, _slots.c.node, _slots.c.storage, _slots.c.acquired_at)
_QUEUE = _waiters.select().order_by(_waiters.c.queued_at, _waiters.c.task_id)


def place_in_line(engine: Engine, task_id: str) -> int:
    """The task's place in the queue (1: next), 0 if it is not queued: an estimate for operators (a waiting
    run shows it in its current details), from three grouped queries whatever the queue's length.

    It counts the waiters for the same node or the same storage that fair turns would serve first if no clone
    ended meanwhile: those of the task's owner queued before it, then, of each other owner, as many as it
    takes for that owner to reach the clones the task's owner will be running when the task's turn comes (one
    more if that owner's oldest waiter is older; the hand-over's tie-break by last turn is left out). Running
    clones are counted against this task's node or storage for every owner, the hand-over counts them against
    each waiter's own."""
    with session(engine) as db:
        me = db.get(CloneWaiter, task_id)
        if me is None:
            return 0
        here = or_(col(CloneWaiter.node) == me.node, col(CloneWaiter.storage) == me.storage)
        running = dict(
            db.exec(
                select(CloneSlot.owner, func.count())
                .where(or_(col(CloneSlot.node) == me.node, col(CloneSlot.storage) == me.storage))
                .group_by(col(CloneSlot.owner))
            ).all()
        )
        mine_ahead = db.exec(
            select(func.count())
            .select_from(CloneWaiter)
            .where(
                here,
                col(CloneWaiter.owner) == me.owner,
                or_(
                    col(CloneWaiter.queued_at) < me.queued_at,
                    and_(col(CloneWaiter.queued_at) == me.queued_at, col(CloneWaiter.task_id) < me.task_id),
                ),
            )
        ).one()
        others = db.exec(
            select(CloneWaiter.owner, func.count(), func.min(CloneWaiter.queued_at))
            .where(here, col(CloneWaiter.owner) != me.owner)
            .group_by(col(CloneWaiter.owner))
        ).all()
        level = running.get(me.owner, 0) + int(mine_ahead)  # the owner's clones here when the task's turn comes
        ahead = int(mine_ahead)
        for owner, waiting, oldest in others:
            ahead += min(int(waiting), max(0, level - running.get(owner, 0) + (oldest < me.queued_at)))
        return ahead + 1


def release(engine: Engine, task_id: str, limits: Limits) -> list[str]:
    """Give up the task's slot (and its place in the queue); hand the freed capacity out in fair turns (the
    module's docstring). Returns the task ids this task has handed a slot to and that have not taken it up
    yet, to be told so: a repeat of the release (a local activity runs again when a worker died before its
    answer was recorded) names them again. Callers that tell runs use `release_and_hand_over`."""
    with _locked(engine) as db:
        task = {"task_id": task_id}
        slot = db.execute(_SLOT_OWNER, task).first()
        for statement in (_FREE_SLOT, _LEAVE_QUEUE, _FORGET_GRANT):
            db.execute(statement, task)
        granted = list(db.execute(_GRANTED_BY, task).scalars().all())
        freed = (slot.owner, slot.node, slot.storage) if slot is not None else None
        return granted + _hand_over(db, limits, task_id, freed)


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


class _Running:
    """The clone slots held, counted in the ways the hand-over asks about them, and kept current as it grants;
    with each owner's last turn on each node and on each storage, as a sortable rank: never (no slot held
    there), the newest slot's start, or a slot freed or granted in this hand-over (later ones rank later)."""

    def __init__(self, slots: Iterable[tuple[str, str, str, datetime]]) -> None:
        self.node: Counter[str] = Counter()
        self.storage: Counter[str] = Counter()
        self.owner_node: Counter[tuple[str, str]] = Counter()
        self.owner_storage: Counter[tuple[str, str]] = Counter()
        self.owner_both: Counter[tuple[str, str, str]] = Counter()
        self.last_turn: dict[tuple[str, str, str], tuple[int, datetime | int]] = {}  # keys: _places
        for owner, node, storage, acquired_at in slots:
            self.add(owner, node, storage)
            for where in _places(owner, node, storage):
                self.last_turn[where] = max(self.last_turn.get(where, (1, acquired_at)), (1, acquired_at))
        self.turns = 0

    def add(self, owner: str, node: str, storage: str) -> None:
        self.node[node] += 1
        self.storage[storage] += 1
        self.owner_node[owner, node] += 1
        self.owner_storage[owner, storage] += 1
        self.owner_both[owner, node, storage] += 1

    def had_turn(self, owner: str, node: str, storage: str) -> None:
        self.turns += 1
        for where in _places(owner, node, storage):
            self.last_turn[where] = (2, self.turns)

    def fit(self, limits: Limits, node: str, storage: str) -> bool:
        """As Limits.fit, without asking the database again."""
        if limits.per_node and self.node[node] >= limits.per_node:
            return False
        return not (limits.per_storage and self.storage[storage] >= limits.per_storage)

    def turn(self, waiter: Row[Any]) -> tuple[int, tuple[int, datetime | int], datetime, str]:
        """The waiter's order in the hand-over, lowest first."""
        owner, node, storage = waiter.owner, waiter.node, waiter.storage
        # The owner's clones on the node or the storage (one on both counts once).
        running = (
            self.owner_node[owner, node] + self.owner_storage[owner, storage] - self.owner_both[owner, node, storage]
        )
        last_turn = max(self.last_turn.get(where, (0, 0)) for where in _places(owner, node, storage))
        return running, last_turn, waiter.queued_at, waiter.task_id


def _places(owner: str, node: str, storage: str) -> tuple[tuple[str, str, str], tuple[str, str, str]]:
    """The keys of an owner's turns on a node and on a storage (a node and a storage may share a name)."""
    return (owner, "node", node), (owner, "storage", storage)


def _hand_over(db: Session, limits: Limits, granted_by: str, freed: tuple[str, str, str] | None) -> list[str]:
    """Grant the free capacity, one slot at a time, to the waiter that fits whose owner has the fewest clones
    running on its node or storage. Ties go to the owner waiting longest for a turn there: whose last turn on
    that node or storage is oldest (none there first, then its newest slot there the oldest; `freed`, the
    owner, node and storage of the slot just freed, has had its turn), then to the waiter queued first.
    Were the queue's age the only tie-break, the owner whose clone just ended would win every tie with its
    lab's older waiters (with one slot per node, every hand-over is a tie), and a third owner would wait for
    one of the labs to end; a turn elsewhere, on another node and storage, is no turn here. One query for
    the slots, one for the waiters, whatever the queue's length: the waiters of one owner for one node and
    storage form a line served in order, so each turn looks only at the head of each line, kept in a heap."""
    running = _Running(db.execute(_RUNNING).all())  # type: ignore[arg-type]
    if freed is not None:
        running.had_turn(*freed)
    lines: dict[tuple[str, str, str], deque[Row[Any]]] = {}
    for waiter in db.execute(_QUEUE).all():
        lines.setdefault((waiter.owner, waiter.node, waiter.storage), deque()).append(waiter)
    # The heads of the lines, lowest turn first. A turn only grows as slots are granted, so an entry whose
    # turn has grown is put back with its new one; a line that no longer fits never will in this hand-over.
    heads = [(running.turn(line[0]), n, key) for n, (key, line) in enumerate(lines.items())]
    heapq.heapify(heads)
    granted: list[str] = []
    while heads:
        turn, n, key = heapq.heappop(heads)
        waiter = lines[key][0]
        if not running.fit(limits, waiter.node, waiter.storage):
            continue
        if (now := running.turn(waiter)) != turn:
            heapq.heappush(heads, (now, n, key))
            continue
        lines[key].popleft()
        at = utcnow()
        db.execute(_LEAVE_QUEUE, {"task_id": waiter.task_id})
        slot = {"task_id": waiter.task_id, "node": waiter.node, "storage": waiter.storage, "owner": waiter.owner}
        db.execute(_NEW_SLOT, {**slot, "acquired_at": at})
        db.execute(_NEW_GRANT, {"task_id": waiter.task_id, "granted_by": granted_by, "granted_at": at})
        running.add(*key)
        running.had_turn(*key)
        granted.append(waiter.task_id)
        if lines[key]:
            heapq.heappush(heads, (running.turn(lines[key][0]), n, key))
    return granted


@contextmanager
def _locked(engine: Engine) -> Iterator[Session]:
    """A write transaction that holds the slot lock."""
    with session(engine) as db, db.begin():
        _lock(db)
        yield db


def _lock(db: Session) -> None:
    """The slot lock, until the transaction ends: on PostgreSQL an advisory lock; SQLite's BEGIN IMMEDIATE has
    serialised every write transaction already."""
    if db.get_bind().dialect.name == "postgresql":
        db.exec(text(f"SELECT pg_advisory_xact_lock({ADVISORY_LOCK_KEY})"))  # type: ignore[call-overload]
