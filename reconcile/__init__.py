"""`boxctl reconcile`: compare PVE with the database and Temporal, report the drift, and repair it on request,
destroying nothing that strong evidence does not show to be a leftover.

Ownership: a VM is a task's only by the contract's rule (`pve.ownership.task_of`: the marker
`pve-boxes task <task_id>` as a whole line of its description, the task id in the task-id format). The
`pve-boxes` tag, or the marker's words inside other text, make no VM anyone's; such a VM is never touched.

Evidence that a task's run is over (`reconcile.drift.evidence_of_end`), needed before anything of it is
repaired: Temporal knows the run and it ended without success (failed, cancelled, terminated, timed out); or
Temporal does not know it and the database shows its reservation released. "Not found" alone is no
evidence: Temporal answers it too for a run going on in another namespace (a wrong TEMPORAL_NAMESPACE), and a
running creation holds its reservation. A run that completed made and recorded its VM: never an orphan.
Whatever the evidence does not cover is reported as a warning, for an operator, and left as it is.

Seven kinds of drift:

- orphan VM: a VM carrying a task's marker when that task has no `Vm` row (not even one seen deleted) and its
  run is over. Repair: stop and destroy it with its disks. A template carrying a marker is only warned about.
  A VM whose task completed but has no record is a warning (a wrong or restored database?), never destroyed.
- stale reservation: a reservation still held although its run is over. Repair: release it.
- VM seen deleted: a live `Vm` row whose VMID is on PVE no more (no guest at all under it). Repair: set its
  `deleted_at`, so that it stops counting against its owner's plan. A VMID that holds a VM without the
  task's marker (reused outside the service, or its notes edited) is not provably gone: a warning, and the
  row keeps counting until an operator decides.
- VM back on PVE: a `Vm` row already seen deleted whose VM is on PVE again (restored from a backup, say).
  Repair: clear `deleted_at`, so that it counts again. Such a VM is never destroyed.
- stale clone slot: a clone slot held, or a place in the queue for one, by a task whose run is over (a
  completed one included: it frees its slot before it ends). Repair: free it, hand it to the next waiting
  run and tell that run.
- a deletion left half done: a live `Vm` row marked as being deleted (`deleting_task_id`) whose deletion's
  run Temporal knows to have ended without success (terminated, timed out; a deletion that fails takes its
  mark back itself). A running deletion is no drift. Unfinished deletion: the VMID is on PVE no more (no
  guest at all, as the deletion itself requires). Repair: set its `deleted_at`, giving its resources back,
  as the deletion would have. Stale deletion mark: the VM is still there with its marker. Repair: clear the
  mark, so that its owner may delete it again (or power it); the repair tool never starts a deletion, since
  a run may have been terminated on purpose. A deletion whose end is not known leaves its mark: a warning.

It refuses (exit status 2, one line per reason, nothing done, nothing changed; without --fix the report says
what --fix would refuse) when the SQLite database file is missing or the database does not exist (it never
creates one), when it is not at the current schema (it never creates or upgrades one), when the Temporal
namespace does not exist, when the database holds no VM records at all while PVE shows VMs carrying the
marker (a new or wrong database), and when it would destroy more than `max_destroy` VMs (default 5).

Every action `--fix` takes is printed and written to the `repair_action` table (reconcile.audit), in the
same transaction as the database change it records where there is one.

State is read in an order that keeps a creation running at the same time from looking like drift: the
`Vm` rows and held reservations before PVE (a row is written only after its VM exists on PVE), PVE before
the workflows, and the workflows before the `Vm` rows that decide whether a VM is owned (a run commits its
row before its workflow closes). A VM whose ownership cannot be told (config unreadable, node offline,
Temporal error) is left alone and reported as a warning. Every repair checks its finding again just
before it acts, and a VM without the marker of the finding's task is never touched.

`guards` checks the database and the namespace, `observe` (reconcile/observe.py) reads the state,
`find_drift` (reconcile/drift.py, pure) turns it into a `Drift`, `repair` (reconcile/repair.py) acts on it,
and `reconcile` here does all of that for boxctl.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from temporalio.client import Client

from db.engine import make_engine
from db.models import RepairAction
from pve.client import PveClient
from reconcile import audit
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
    evidence_of_end,
    find_drift,
)
from reconcile.guards import Refused, missing_database, namespace_refusal, schema_refusal
from reconcile.observe import ReconcileError, observe
from reconcile.repair import free_clone_slot, repair
from settings import Settings, SettingsError
from temporal_client import connect_temporal

__all__ = [
    "DEFAULT_MAX_DESTROY",
    "NOT_FOUND",
    "RUNNING",
    "Drift",
    "Finding",
    "HeldReservation",
    "Kind",
    "Observed",
    "PveVm",
    "ReconcileError",
    "Refused",
    "Report",
    "VmRecord",
    "WorkflowState",
    "evidence_of_end",
    "find_drift",
    "free_clone_slot",
    "history",
    "observe",
    "reconcile",
    "repair",
]

# More orphans than this at once looks more like a wrong database or namespace than like leftovers.
DEFAULT_MAX_DESTROY = 5


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
        """0 when consistent or fully repaired; 1 when findings remain or something could not be checked;
        2 when --fix refuses (or would refuse) to act."""
        if self.drift.refusals:
            return 2
        return 1 if self.remaining or self.drift.warnings else 0

    def lines(self) -> list[str]:
        lines = [f.line() for f in self.drift.findings]
        lines += [f"warning: {w}" for w in self.drift.warnings]
        refused = "refused" if self.fix else "--fix would refuse"
        lines += [f"{refused}: {r}" for r in self.drift.refusals]
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
            if self.fix and self.drift.refusals:
                summary += ": refused, nothing done"
            elif self.fix:
                summary += f": {len(findings) - len(self.remaining)} repaired, {len(self.remaining)} remaining"
            else:
                summary += ": run with --fix to repair"
            summary += f"; {checked}"
        if self.drift.warnings:
            summary += f"; {len(self.drift.warnings)} warnings"
        return [*lines, summary]


# ------------------------------------------------------------------------------------- running it


def _engine(settings: Settings, reasons: list[str]) -> Engine | None:
    """An engine on the settings' database, None (with the reason) if it is missing: never created."""
    url = settings.database_url.get_secret_value()
    missing = missing_database(url)
    if missing is not None:
        reasons.append(missing)
        return None
    return make_engine(url)


async def _connect(settings: Settings) -> Client:
    """Raises SettingsError for unusable TLS settings, ReconcileError if Temporal cannot be reached."""
    try:
        return await connect_temporal(settings)
    except SettingsError:
        raise
    except Exception as exc:
        raise ReconcileError(f"cannot reach Temporal at {settings.temporal_address}: {exc}") from exc


async def reconcile(
    settings: Settings,
    fix: bool,
    *,
    max_destroy: int = DEFAULT_MAX_DESTROY,
    temporal: Client | None = None,
    engine: Engine | None = None,
    pve: PveClient | None = None,
) -> Report:
    """Compare PVE with the database and Temporal; with `fix`, repair what differs, unless the drift holds a
    refusal (see the package's docstring). Raises Refused when it cannot even look (a database or namespace
    that does not exist, a schema not current), ReconcileError when PVE, Temporal or the database cannot be
    reached."""
    reasons: list[str] = []
    own_engine = engine is None
    if engine is None:
        engine = _engine(settings, reasons)
    try:
        if temporal is None:
            try:
                temporal = await _connect(settings)
            except ReconcileError as exc:
                if reasons:  # a refusal already: said as such, with why nothing more could be checked
                    raise Refused([*reasons, str(exc)]) from exc
                raise
        if (refusal := await namespace_refusal(temporal)) is not None:
            reasons.append(refusal)
        if engine is not None and (refusal := await asyncio.to_thread(schema_refusal, engine)) is not None:
            reasons.append(refusal)
        if reasons or engine is None:
            raise Refused(reasons)
        client = pve or PveClient(settings)
        try:
            observed = await observe(client, temporal, engine)
            drift = find_drift(observed, max_destroy)
            if fix:
                await repair(drift, client, temporal, engine, settings)
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
        if own_engine and engine is not None:
            engine.dispose()


def history(settings: Settings, limit: int) -> list[RepairAction]:
    """The last `limit` actions of the repair tool, oldest first (Refused if the database cannot be read)."""
    reasons: list[str] = []
    engine = _engine(settings, reasons)
    if engine is None:
        raise Refused(reasons)
    try:
        if (refusal := schema_refusal(engine)) is not None:
            raise Refused([refusal])
        return audit.history(engine, limit)
    except SQLAlchemyError as exc:
        raise ReconcileError(f"database: {exc}") from exc
    finally:
        engine.dispose()
