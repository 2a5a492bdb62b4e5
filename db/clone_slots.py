"""Clone slots: how many full clones run at once per node and per storage. Acquiring is atomic across
workers and API processes (BEGIN IMMEDIATE on SQLite, a transaction-scoped advisory lock on PostgreSQL)."""

from sqlalchemy import Engine, func, text
from sqlmodel import select

from db.engine import session
from db.models import CloneSlot
from payloads import CloneSlotRequest

# Any constant: the advisory lock that serialises slot acquisition on PostgreSQL.
ADVISORY_LOCK_KEY = 0x0B0C5107


def acquire(engine: Engine, req: CloneSlotRequest, per_node: int, per_storage: int) -> bool:
    """Take a slot for req.task_id if both limits allow it (or it already holds one)."""
    with session(engine) as db, db.begin():
        if engine.dialect.name == "postgresql":
            db.exec(text(f"SELECT pg_advisory_xact_lock({ADVISORY_LOCK_KEY})"))  # type: ignore[call-overload]
        if db.get(CloneSlot, req.task_id) is not None:
            return True
        if per_node and _count(db, CloneSlot.node == req.node) >= per_node:
            return False
        if per_storage and _count(db, CloneSlot.storage == req.storage) >= per_storage:
            return False
        db.add(CloneSlot(task_id=req.task_id, node=req.node, storage=req.storage))
        return True


def release(engine: Engine, task_id: str) -> None:
    with session(engine) as db, db.begin():
        slot = db.get(CloneSlot, task_id)
        if slot is not None:
            db.delete(slot)


def _count(db, condition) -> int:  # type: ignore[no-untyped-def]
    return int(db.exec(select(func.count()).select_from(CloneSlot).where(condition)).one())
