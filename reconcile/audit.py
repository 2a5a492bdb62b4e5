"""The repair tool's audit trail: one `repair_action` row per action `--fix` takes, written in the same
transaction as the database change it records where there is one, and read back by `boxctl reconcile
--history`."""

from __future__ import annotations

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col, select

from db.engine import session
from db.models import RepairAction
from reconcile.drift import Finding


def add(db: Session, finding: Finding, action: str, username: str = "", detail: str = "") -> None:
    """Add the audit row of `action` taken on `finding` to the transaction of `db`; `detail` defaults to the
    finding's reason (the evidence it was acted on)."""
    db.add(
        RepairAction(
            kind=finding.kind.value,
            action=action,
            task_id=finding.task_id,
            vmid=finding.vmid,
            node=finding.node,
            username=username or finding.username,
            detail=detail or finding.reason,
        )
    )


def write(engine: Engine, finding: Finding, action: str, detail: str = "") -> str:
    """Write the audit row of an action that changed nothing in the database (a VM destroyed on PVE): the
    action as it is to be reported, saying so if the row could not be written (the action stands)."""
    try:
        with session(engine) as db, db.begin():
            add(db, finding, action, detail=detail)
    except SQLAlchemyError as exc:  # the action is done: report it whatever the database says
        return f"{action} (NOT written to the audit table: {exc})"
    return action


def history(engine: Engine, limit: int) -> list[RepairAction]:
    """The last `limit` actions, oldest first."""
    with session(engine) as db:
        rows = db.exec(select(RepairAction).order_by(col(RepairAction.id).desc()).limit(limit)).all()
    return list(reversed(rows))
