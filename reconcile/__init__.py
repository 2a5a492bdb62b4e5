"""`boxctl reconcile`: compare PVE with the database and Temporal, report the drift, and repair it on request.

Five kinds of drift:

- orphan VM: a VM on PVE whose description names a task as its owner (the marker line of `pve.ownership`)
  when that task owns no `Vm` row and its workflow is not running (not found, or closed). Repair: stop and
  destroy it with its disks. A template carrying a marker is only warned about.
- stale reservation: a reservation still held although its workflow is not running. Repair: release it.
- VM seen deleted: a live `Vm` row whose VM is no longer on PVE (no VM with that VMID carries the task's
  marker). Repair: set its `deleted_at`, so that it stops counting against its owner's plan.
- VM back on PVE: a `Vm` row already seen deleted whose VM is on PVE again (restored from a backup, say).
  Repair: clear `deleted_at`, so that it counts again. Such a VM is never destroyed.
- stale clone slot: a clone slot held, or a place in the queue for one, by a task whose workflow is not
  running (an operator terminated it, so its cleanup never ran). Repair: free it, hand it to the next
  waiting run and tell that run.

State is read in an order that keeps a creation running at the same time from looking like drift: the
`Vm` rows and held reservations before PVE (a row is written only after its VM exists on PVE), PVE before
the workflows, and the workflows before the `Vm` rows that decide whether a VM is owned (a run commits its
row before its workflow closes). A VM whose ownership cannot be told (config unreadable, node offline,
Temporal error) is left alone and reported as a warning. Every repair checks its finding again just
before it acts, and a VM without the marker of the finding's task is never touched.

`observe` (reconcile/observe.py) reads the state, `find_drift` (reconcile/drift.py, pure) turns it into a
`Drift`, `repair` (reconcile/repair.py) acts on it, and `reconcile` here does all three for boxctl.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from temporalio.client import Client

from db.engine import make_engine
from db.schema import SchemaError, require_current
from pve.client import PveClient
from reconcile.drift import (
    NOT_FOUND,
    RUNNING,
    Drift,
    Finding,
    HeldReservation,
    Kind,
    Observed,
    PveVm,
    VmRecord,
    WorkflowState,
    find_drift,
)
from reconcile.observe import ReconcileError, observe
from reconcile.repair import free_clone_slot, repair
from settings import Settings

__all__ = [
    "NOT_FOUND",
    "RUNNING",
    "Drift",
    "Finding",
    "HeldReservation",
    "Kind",
    "Observed",
    "PveVm",
    "ReconcileError",
    "Report",
    "VmRecord",
    "WorkflowState",
    "find_drift",
    "free_clone_slot",
    "observe",
    "reconcile",
    "repair",
]


# ---------------------------------------------------------------------------------------- report


@dataclass
class Report:
    drift: Drift
    fix: bool
    vms_checked: int = 0
    records: int = 0
    held: int = 0

    @property
    def remaining(self) -> list[Finding]:
        return [f for f in self.drift.findings if f.remaining]

    @property
    def exit_code(self) -> int:
        """0 when consistent or fully repaired; 1 when findings remain or something could not be checked."""
        return 1 if self.remaining or self.drift.warnings else 0

    def lines(self) -> list[str]:
        lines = [f.line() for f in self.drift.findings]
        lines += [f"warning: {w}" for w in self.drift.warnings]
        checked = (
            f"checked VMs on PVE: {self.vms_checked}, live VM records: {self.records}, held reservations: {self.held}"
        )
        findings = self.drift.findings
        if not findings:
            summary = f"consistent: {checked}"
        else:
            counts = ", ".join(
                f"{kind.value}: {n}" for kind in Kind if (n := sum(1 for f in findings if f.kind is kind))
            )
            summary = f"{len(findings)} findings ({counts})"
            if self.fix:
                summary += f": {len(findings) - len(self.remaining)} repaired, {len(self.remaining)} remaining"
            else:
                summary += ": run with --fix to repair"
            summary += f"; {checked}"
        if self.drift.warnings:
            summary += f"; {len(self.drift.warnings)} warnings"
        return [*lines, summary]


async def reconcile(
    settings: Settings,
    fix: bool,
    *,
    temporal: Client | None = None,
    engine: Engine | None = None,
    pve: PveClient | None = None,
) -> Report:
    """Compare PVE with the database and Temporal; with `fix`, repair what differs."""
    own_engine = engine is None
    if engine is None:
        engine = make_engine(settings.database_url)
    try:
        if temporal is None:
            try:
                temporal = await Client.connect(settings.temporal_address, namespace=settings.temporal_namespace)
            except Exception as exc:
                raise ReconcileError(f"cannot reach Temporal at {settings.temporal_address}: {exc}") from exc
        client = pve or PveClient(settings)
        try:
            if own_engine:  # a database laid out for another version is refused, as by every process
                await asyncio.to_thread(require_current, engine)
            observed = await observe(client, temporal, engine)
            drift = find_drift(observed)
            if fix:
                await repair(drift, client, temporal, engine, settings)
        except SchemaError as exc:
            raise ReconcileError(str(exc)) from exc
        except SQLAlchemyError as exc:
            raise ReconcileError(f"database: {exc}") from exc
        return Report(
            drift=drift,
            fix=fix,
            vms_checked=observed.vms_checked,
            records=sum(1 for r in observed.records_before if not r.deleted),
            held=len(observed.held),
        )
    finally:
        if own_engine:
            engine.dispose()
