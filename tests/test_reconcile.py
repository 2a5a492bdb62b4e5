"""`boxctl reconcile`: orphan VMs, stale reservations and VMs deleted on PVE are reported, repaired with --fix
on strong evidence only, and nothing else is ever touched; a database, namespace or drift that looks wrong
makes it refuse outright. Against a real Temporal dev server, a fake PVE and the real database."""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from google.protobuf.duration_pb2 import Duration
from pydantic import SecretStr
from sqlalchemy import Engine
from sqlmodel import col, select
from temporalio.api.workflowservice.v1 import RegisterNamespaceRequest
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

import boxctl
import settings as settings_module
from db import clone_slots, vms
from db.engine import session
from db.models import (
    COMMITTED,
    HELD,
    RELEASED,
    CloneGrant,
    CloneSlot,
    CloneWaiter,
    RepairAction,
    Reservation,
    Vm,
)
from payloads import MSG_CREATED, MSG_TOTAL_LIMIT
from pve.ownership import vm_description
from reconcile import (
    NOT_FOUND,
    RUNNING,
    Finding,
    HeldReservation,
    Kind,
    Observed,
    PveVm,
    Report,
    VmRecord,
    WorkflowState,
    find_drift,
    free_clone_slot,
    reconcile,
)
from settings import Settings
from tests.conftest import created_vms, reservations, vm_records
from tests.factories import auth, body
from tests.waiting import until
from workflows.delete_vm import deletion_task_id

CREATE = "/api/v1/vm/manage/createFromBoxTemplate"
# A task of long ago whose VM was deleted: its row shows the database is the service's (see `seen_before`).
OLD_TASK = "clone-old-1"


def task(kind: str = "x") -> str:
    """A task id no other test uses: the Temporal dev server is shared by the whole session."""
    return f"clone-{kind}-{uuid.uuid4().hex[:8]}"


async def ended(temporal: Client, *task_ids: str) -> None:
    """Runs under these ids that Temporal knows to have ended without success (terminated)."""
    for task_id in task_ids:
        handle = await temporal.start_workflow("NoSuchWorkflow", id=task_id, task_queue="nobody-polls-this")
        await handle.terminate("test: ended without success")


def leak(pve: Any, vmid: int, task_id: str, **kwargs: Any) -> Any:
    """A VM the service made for a task that owns nothing."""
    return pve.add_vm(
        vmid, "leak", node="pve2", config={"description": vm_description(task_id), "tags": "pve-boxes"}, **kwargs
    )


def not_ours(pve: Any) -> list[Any]:
    """VMs without the service's marker: tagged like ours, untagged, and naming the marker's words loosely."""
    return [
        pve.add_vm(151, "by-hand", node="pve2", config={"description": "made by hand", "tags": "pve-boxes"}),
        pve.add_vm(152, "plain", node="pve1", status="running"),
        pve.add_vm(153, "notes", node="pve1", config={"description": "pve-boxes task"}),
        # The marker's words inside other text are no marker: only a whole line is (the contract's ownership).
        pve.add_vm(154, "quoting", node="pve1", config={"description": "cloned by hand from pve-boxes task clone-x-9"}),
    ]


def writes(pve: Any) -> list[tuple[str, str]]:
    """Every PVE request that could change something (logins aside)."""
    return [(r[0], r[1]) for r in pve.requests if r[0] != "GET" and "/access/ticket" not in r[1]]


def vm_row(engine: Engine, task_id: str) -> Vm:
    with session(engine) as db:
        row = db.get(Vm, task_id)
    assert row is not None
    return row


def add_vm_row(engine: Engine, task_id: str, vmid: int, *, deleted: bool = False, node: str = "pve2") -> None:
    with session(engine) as db, db.begin():
        db.add(
            Vm(
                task_id=task_id,
                username="alice",
                vmid=vmid,
                node=node,
                name="web",
                cores=2,
                memory_mb=2048,
                disk_gb=20,
                deleted_at=datetime.now(UTC) if deleted else None,
            )
        )


def add_reservation(engine: Engine, task_id: str, vmid: int, state: str = HELD, username: str = "alice") -> None:
    with session(engine) as db, db.begin():
        db.add(
            Reservation(task_id=task_id, username=username, cores=1, memory_mb=512, disk_gb=10, vmid=vmid, state=state)
        )


def no_clone_slots(engine: Engine) -> bool:
    with session(engine) as db:
        return db.exec(select(CloneSlot)).first() is None


def audit_rows(engine: Engine) -> list[RepairAction]:
    with session(engine) as db:
        return list(db.exec(select(RepairAction).order_by(col(RepairAction.id))).all())


def kinds(report: Report) -> list[tuple[Kind, str, int | None]]:
    return [(f.kind, f.task_id, f.vmid) for f in report.drift.findings]


async def create(api: httpx.AsyncClient, **overrides: Any) -> httpx.Response:
    return await api.post(CREATE + "?wait=30", json=body(**overrides), headers=auth())


@pytest.fixture
def seen_before(engine: Engine) -> Engine:
    """The service has made a VM before (deleted since): the database is plainly the service's, not a new one."""
    add_vm_row(engine, OLD_TASK, 199, deleted=True)
    return engine


@pytest.fixture
def cli(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Run boxctl in a thread with the settings' environment (read again each time: tests may change them)."""

    async def run(*argv: str) -> int:
        for name in ("temporal_address", "temporal_namespace", "pve_host", "pve_user"):
            monkeypatch.setenv(name.upper(), str(getattr(settings, name)))
        monkeypatch.setenv("DATABASE_URL", settings.database_url.get_secret_value())
        monkeypatch.setenv("PVE_PASSWORD", settings.pve_password.get_secret_value())
        monkeypatch.setenv("PVE_PORT", str(settings.pve_port))
        monkeypatch.setenv("PVE_CA_FILE", settings.pve_ca_file)
        settings_module.get_settings.cache_clear()
        return await asyncio.to_thread(boxctl.main, list(argv))

    yield run
    settings_module.get_settings.cache_clear()


# --------------------------------------------------------------------------------- orphan VMs


@pytest.mark.usefixtures("seen_before")
async def test_orphan_vm_is_reported_then_destroyed_and_nothing_else_is_touched(
    settings: Settings, temporal: Client, pve: Any, engine: Engine
) -> None:
    leaked = task()
    await ended(temporal, leaked)
    orphan = leak(pve, 150, leaked, status="running")
    others = not_ours(pve)

    report = await reconcile(settings, fix=False)
    assert kinds(report) == [(Kind.ORPHAN_VM, leaked, 150)]
    lines = report.lines()
    assert lines[0] == f"orphan VM 150 on pve2 (task {leaked}): no successful task owns it (workflow terminated)"
    assert lines[-1].startswith("1 findings (orphan VM: 1): run with --fix to repair")
    assert report.exit_code == 1
    assert orphan in pve.vms
    assert writes(pve) == []

    report = await reconcile(settings, fix=True)
    assert report.lines()[0].endswith("(workflow terminated): destroyed")
    assert report.exit_code == 0
    assert orphan not in pve.vms
    assert all(vm in pve.vms for vm in others)
    # Stopped first, then destroyed with its disks; nothing else was written to.
    assert writes(pve) == [
        ("POST", "/api2/json/nodes/pve2/qemu/150/status/stop"),
        ("DELETE", "/api2/json/nodes/pve2/qemu/150"),
    ]
    [destroy] = [t for t in pve.tasklog if t["type"] == "qmdestroy"]
    assert (destroy["id"], destroy["exitstatus"]) == ("150", "OK")
    assert any("purging VM 150" in line for line in destroy["log"])  # purge=1 reached PVE

    again = await reconcile(settings, fix=True)
    assert again.drift.findings == [] and again.drift.warnings == []
    assert again.exit_code == 0
    assert again.lines()[-1].startswith("consistent: checked")
    assert all(vm in pve.vms for vm in others)


@pytest.mark.usefixtures("seen_before")
async def test_a_locked_orphan_is_left_until_the_lock_is_gone(settings: Settings, temporal: Client, pve: Any) -> None:
    leaked = task()
    await ended(temporal, leaked)
    orphan = leak(pve, 150, leaked)
    pve.snapshot_lock(150, "backup")

    report = await reconcile(settings, fix=True)
    [finding] = report.drift.findings
    assert finding.remaining and finding.failed is not None and "locked (backup)" in finding.failed
    assert "NOT repaired" in report.lines()[0]
    assert report.exit_code == 1
    assert orphan in pve.vms

    pve.unlock(150)
    report = await reconcile(settings, fix=True)
    assert [f.repaired for f in report.drift.findings] == ["destroyed"]
    assert orphan not in pve.vms


@pytest.mark.usefixtures("worker")
async def test_a_successful_creation_is_left_alone(
    settings: Settings, api: httpx.AsyncClient, pve: Any, engine: Engine
) -> None:
    response = await create(api)
    assert response.json()["message"] == MSG_CREATED
    task_id = response.json()["data"]["task_id"]

    report = await reconcile(settings, fix=True)
    assert report.drift.findings == [] and report.drift.warnings == []
    assert report.exit_code == 0
    assert report.lines() == ["consistent: checked VMs on PVE: 2, live VM records: 1, held reservations: 0"]
    [vm] = created_vms(pve)
    assert vm.config["description"] == vm_description(task_id)
    assert vm_row(engine, task_id).deleted_at is None
    assert [r.state for r in reservations(engine)] == [COMMITTED]


@pytest.mark.usefixtures("worker")
async def test_a_completed_runs_vm_without_a_record_is_never_destroyed(
    settings: Settings, api: httpx.AsyncClient, pve: Any, engine: Engine
) -> None:
    """A database restored from an older backup (or another installation's) lacks the row of a VM whose run
    succeeded: that VM is someone's, and only an operator can tell whose."""
    first = (await create(api, name="first")).json()["data"]
    assert (await create(api, name="second")).json()["message"] == MSG_CREATED
    with session(engine) as db, db.begin():
        db.delete(db.get(Vm, first["task_id"]))

    report = await reconcile(settings, fix=True)
    assert report.drift.findings == []
    assert report.drift.warnings == [
        f"VM {first['vmid']} on pve2, made by task {first['task_id']}, has no record and is left alone: its run "
        "succeeded; an operator decides (is DATABASE_URL the service's database?)"
    ]
    assert report.exit_code == 1
    assert len(created_vms(pve)) == 2 and pve.vm(int(first["vmid"])) in pve.vms
    assert audit_rows(engine) == []


@pytest.mark.usefixtures("seen_before")
async def test_a_strangers_vm_quoting_the_marker_is_never_destroyed(
    settings: Settings, temporal: Client, pve: Any, engine: Engine
) -> None:
    """The marker counts only as a whole line (the contract's ownership, pve.ownership.task_of), even when
    the task it names has ended without success and owns nothing."""
    named = task()
    await ended(temporal, named)
    strangers = [
        pve.add_vm(170, "quoting", node="pve1", config={"description": f"copied from pve-boxes task {named} by hand"}),
        pve.add_vm(171, "more-after", node="pve1", config={"description": f"pve-boxes task {named} (my copy)"}),
        pve.add_vm(172, "quoted", node="pve2", config={"description": f"notes:\n> pve-boxes task {named}\nbye"}),
    ]

    for fix in (False, True):
        report = await reconcile(settings, fix=fix)
        assert report.drift.findings == [] and report.drift.warnings == [] and report.exit_code == 0
    assert all(vm in pve.vms for vm in strangers)
    assert writes(pve) == []
    assert audit_rows(engine) == []


@pytest.mark.usefixtures("worker", "seen_before")
@pytest.mark.fakepve(time_scale=1)
async def test_a_running_creation_is_left_alone_and_a_terminated_one_is_cleaned_up(
    settings: Settings, api: httpx.AsyncClient, temporal: Client, pve: Any, engine: Engine
) -> None:
    pve.add_ceph_storage("ceph")
    pve.ceph_slow(3)  # the clone onto ceph takes 3 s
    response = await api.post(CREATE, json=body(storage="ceph"), headers=auth())
    task_id = response.json()["data"]["task_id"]
    await until(lambda: any(vm.lock == "clone" for vm in created_vms(pve)))

    # Mid-clone: the VM carries the marker and no Vm row owns it, but its workflow is running.
    report = await reconcile(settings, fix=True)
    assert report.drift.findings == [] and report.exit_code == 0
    assert len(created_vms(pve)) == 1
    assert [r.state for r in reservations(engine)] == [HELD]

    # Terminated (no cleanup runs): the half-made VM and the held quota are left behind.
    await temporal.get_workflow_handle(task_id).terminate("operator")
    report = await reconcile(settings, fix=False)
    assert sorted(kinds(report)) == [
        (Kind.ORPHAN_VM, task_id, 100),
        (Kind.STALE_CLONE_SLOT, task_id, None),
        (Kind.STALE_RESERVATION, task_id, 100),
    ]
    assert "(workflow terminated)" in report.lines()[0]
    assert report.exit_code == 1

    await until(lambda: all(vm.lock is None for vm in created_vms(pve)))
    report = await reconcile(settings, fix=True)
    assert sorted(f.repaired or "" for f in report.drift.findings) == ["destroyed", "freed", "released"]
    assert report.exit_code == 0
    assert created_vms(pve) == []
    assert [r.state for r in reservations(engine)] == [RELEASED]
    assert (await reconcile(settings, fix=False)).exit_code == 0


@pytest.mark.usefixtures("worker", "seen_before")
async def test_a_wrong_namespace_leaves_a_running_creation_alone(
    settings: Settings, api: httpx.AsyncClient, temporal: Client, pve: Any, engine: Engine
) -> None:
    """TEMPORAL_NAMESPACE names a namespace that exists but is not the service's: Temporal knows none of the
    service's runs there. A creation running in the right one keeps its VM and its reservation."""
    try:
        await temporal.workflow_service.register_namespace(
            RegisterNamespaceRequest(
                namespace="not-the-services", workflow_execution_retention_period=Duration(seconds=86400)
            )
        )
    except RPCError as exc:
        if exc.status != RPCStatusCode.ALREADY_EXISTS:
            raise
    pve.fail("PUT", "/config", 503, "node busy")  # the run retries its configure: running, VM made and unlocked
    response = await api.post(CREATE, json=body(), headers=auth())
    task_id = response.json()["data"]["task_id"]
    await until(lambda: [vm.lock for vm in created_vms(pve)] == [None])
    await until(lambda: no_clone_slots(engine))  # freed once the clone is done
    wrong = settings.model_copy(update={"temporal_namespace": "not-the-services"})

    try:
        report = await reconcile(wrong, fix=True)
        assert report.drift.findings == []
        vm_warning, reservation_warning = report.drift.warnings
        assert vm_warning.startswith(f"VM 100 on pve2, made by task {task_id}, has no record and is left alone")
        assert vm_warning.endswith(
            "left alone: Temporal does not know its run and its reservation is held: it may be running in another "
            "namespace (is TEMPORAL_NAMESPACE right?) or be past retention; an operator decides"
        )
        assert reservation_warning.startswith(f"the held reservation of task {task_id} (alice) is left alone: ")
        assert report.exit_code == 1
        assert len(created_vms(pve)) == 1
        assert [r.state for r in reservations(engine)] == [HELD]
        assert audit_rows(engine) == []
    finally:
        await temporal.get_workflow_handle(task_id).terminate("test over")


@pytest.mark.usefixtures("one_clone_per_node", "worker", "seen_before")
@pytest.mark.fakepve(time_scale=1)
async def test_a_clone_slot_left_by_a_terminated_run_goes_to_the_next_in_line(
    settings: Settings, api: httpx.AsyncClient, temporal: Client, pve: Any, engine: Engine
) -> None:
    pve.add_ceph_storage("ceph")
    pve.ceph_slow(2)
    first = (await api.post(CREATE, json=body(name="first", storage="ceph"), headers=auth())).json()["data"]
    second = (await api.post(CREATE, json=body(name="second", storage="ceph"), headers=auth())).json()["data"]
    await until(lambda: any(vm.lock == "clone" for vm in created_vms(pve)))
    await temporal.get_workflow_handle(first["task_id"]).terminate("operator")  # its slot is never freed

    report = await reconcile(settings, fix=True)
    [freed] = [f for f in report.drift.findings if f.kind is Kind.STALE_CLONE_SLOT]
    assert freed.repaired == f"freed, handed to {second['task_id']}"
    result = await asyncio.wait_for(
        temporal.get_workflow_handle(second["task_id"]).result(), 60
    )  # told at once, not at its next look minutes later
    assert result["vmid"] == 101


@pytest.mark.usefixtures("one_clone_per_node")
async def test_a_freed_slot_passes_over_runs_that_ended_meanwhile(
    settings: Settings, temporal: Client, engine: Engine
) -> None:
    """The runs in line behind a stale slot ended between reconcile's look and its repair: the slot goes down
    the line past them, and none is left held."""
    holder, *waiters = task("gone"), task("gone"), task("gone")
    await ended(temporal, holder, *waiters)
    with session(engine) as db, db.begin():
        db.add(CloneSlot(task_id=holder, node="pve1", storage="NFS"))
    for waiter in waiters:
        assert not clone_slots.acquire(engine, waiter, "pve1", "NFS", clone_slots.Limits(per_node=1, per_storage=0))

    finding = Finding(Kind.STALE_CLONE_SLOT, holder)
    assert await free_clone_slot(finding, temporal, engine, settings) == "freed"
    with session(engine) as db:
        assert db.exec(select(CloneSlot)).all() == []
        assert db.exec(select(CloneWaiter)).all() == []
        assert db.exec(select(CloneGrant)).all() == []


@pytest.mark.usefixtures("one_clone_per_node")
async def test_a_freed_slot_stays_with_a_waiter_temporal_does_not_know(
    settings: Settings, temporal: Client, engine: Engine
) -> None:
    """A waiter whose run Temporal does not know (it may run in the right namespace while this one is wrong)
    keeps the slot it is handed: it finds it at its next look."""
    holder, waiter = task("gone"), task("unknown")
    await ended(temporal, holder)
    add_reservation(engine, waiter, 130)
    with session(engine) as db, db.begin():
        db.add(CloneSlot(task_id=holder, node="pve1", storage="NFS"))
    assert not clone_slots.acquire(engine, waiter, "pve1", "NFS", clone_slots.Limits(per_node=1, per_storage=0))

    finding = Finding(Kind.STALE_CLONE_SLOT, holder)
    done = await free_clone_slot(finding, temporal, engine, settings)
    assert done == f"freed, handed to {waiter} (not told: it looks again within minutes)"
    with session(engine) as db:
        assert [s.task_id for s in db.exec(select(CloneSlot)).all()] == [waiter]


# ------------------------------------------------------------------------------- reservations


async def test_a_held_reservation_of_an_ended_run_is_released(
    settings: Settings, temporal: Client, pve: Any, engine: Engine
) -> None:
    gone = task("gone")
    await ended(temporal, gone)
    add_reservation(engine, gone, 120)

    report = await reconcile(settings, fix=False)
    assert kinds(report) == [(Kind.STALE_RESERVATION, gone, 120)]
    assert report.lines()[0] == (
        f"stale reservation of task {gone} (alice, VMID 120): held, but its workflow is not running "
        "(workflow terminated)"
    )
    assert report.exit_code == 1
    assert [r.state for r in reservations(engine)] == [HELD]

    report = await reconcile(settings, fix=True)
    assert report.lines()[0].endswith(": released")
    assert report.exit_code == 0
    assert [r.state for r in reservations(engine)] == [RELEASED]
    assert (await reconcile(settings, fix=True)).drift.findings == []
    assert writes(pve) == []


async def test_the_reservations_of_a_labs_creations_that_never_started_are_released_once_the_lab_has_ended(
    settings: Settings, temporal: Client, pve: Any, engine: Engine
) -> None:
    """A lab terminated after its admission held its VMs' quota, before it started their creations: Temporal
    does not know those creations, and only the lab would have started them."""
    ended_lab, running_lab = f"lab-{uuid.uuid4().hex[:8]}", f"lab-{uuid.uuid4().hex[:8]}"
    for lab_id in (ended_lab, running_lab):
        await temporal.start_workflow("LabWorkflow", id=lab_id, task_queue="nobody-polls-this")
    await temporal.get_workflow_handle(ended_lab).terminate("test: terminated before its creations started")
    add_reservation(engine, f"{ended_lab}-01", 120)
    add_reservation(engine, f"{ended_lab}-02-retry", 121)
    add_reservation(engine, f"{running_lab}-01", 122)  # its lab may still start it

    report = await reconcile(settings, fix=True)

    assert sorted(kinds(report)) == [
        (Kind.STALE_RESERVATION, f"{ended_lab}-01", 120),
        (Kind.STALE_RESERVATION, f"{ended_lab}-02-retry", 121),
    ]
    assert f"(workflow never started, its lab {ended_lab} is terminated): released" in report.lines()[0]
    states = {r.task_id: r.state for r in reservations(engine)}
    assert states == {f"{ended_lab}-01": RELEASED, f"{ended_lab}-02-retry": RELEASED, f"{running_lab}-01": HELD}
    await temporal.get_workflow_handle(running_lab).terminate("test: done")


async def test_a_held_reservation_whose_run_temporal_does_not_know_is_left_held(
    settings: Settings, pve: Any, engine: Engine
) -> None:
    unknown = task("unknown")
    add_reservation(engine, unknown, 120)

    report = await reconcile(settings, fix=True)
    assert report.drift.findings == []
    [warning] = report.drift.warnings
    assert warning.startswith(f"the held reservation of task {unknown} (alice) is left alone: Temporal does not")
    assert report.exit_code == 1
    assert [r.state for r in reservations(engine)] == [HELD]


# -------------------------------------------------------------------------- VMs deleted on PVE


@pytest.mark.usefixtures("worker")
async def test_a_vm_deleted_on_pve_is_seen_deleted_and_its_quota_comes_back(
    settings: Settings, api: httpx.AsyncClient, pve: Any, engine: Engine
) -> None:
    big = {"cpuCores": 4, "memorySize": 8192, "diskSize": 100}  # half of alice's totals
    first = (await create(api, name="big-1", **big)).json()["data"]
    assert (await create(api, name="big-2", **big)).json()["message"] == MSG_CREATED
    refused = await create(api, name="big-3", **big)
    assert (refused.status_code, refused.json()["message"]) == (400, MSG_TOTAL_LIMIT)

    pve.vms.remove(pve.vm(int(first["vmid"])))  # deleted by hand on PVE

    report = await reconcile(settings, fix=False)
    assert kinds(report) == [(Kind.VANISHED_VM, first["task_id"], int(first["vmid"]))]
    assert report.lines()[0] == (
        f"VM {first['vmid']} on pve2 (task {first['task_id']}, alice) is gone from PVE but still counts "
        "against the plan (VM 'big-1')"
    )
    assert report.exit_code == 1
    assert vm_row(engine, first["task_id"]).deleted_at is None
    assert (await create(api, name="big-3", **big)).status_code == 400

    report = await reconcile(settings, fix=True)
    assert report.lines()[0].endswith(": marked deleted")
    assert report.exit_code == 0
    assert vm_row(engine, first["task_id"]).deleted_at is not None

    again = await create(api, name="big-3", **big)
    assert again.json()["message"] == MSG_CREATED
    # The new VM may well reuse the VMID; it is another task's, so nothing is found either way.
    final = await reconcile(settings, fix=False)
    assert final.drift.findings == [] and final.exit_code == 0


async def test_a_vmid_holding_a_vm_without_the_marker_keeps_counting(
    settings: Settings, pve: Any, engine: Engine
) -> None:
    """A live record whose VMID now holds a VM without its task's marker (notes edited, or the VMID reused
    outside the service) is not provably gone: marking it deleted would let anyone who can edit notes get
    round the plan. Reported; it keeps counting."""
    edited, reused = task("edited"), task("reused")
    add_vm_row(engine, edited, 170)
    add_vm_row(engine, reused, 171, node="pve1")
    pve.add_vm(170, "web", node="pve2", config={"description": "my notes now", "tags": "pve-boxes"})
    pve.add_vm(171, "other", node="pve1", config={"description": vm_description(task("someone"))})

    report = await reconcile(settings, fix=True)
    assert report.drift.findings == []
    warnings = report.drift.warnings
    assert (
        f"VM 170 on pve2 does not carry task {edited}'s marker: left counting against alice's plan "
        "(an operator decides)"
    ) in warnings
    assert (
        f"VM 171 on pve1 does not carry task {reused}'s marker: left counting against alice's plan "
        "(an operator decides)"
    ) in warnings
    # And the VM now under 171 is another task's, which nobody knows: left alone too.
    assert len(warnings) == 3
    assert report.exit_code == 1
    assert vm_row(engine, edited).deleted_at is None and vm_row(engine, reused).deleted_at is None
    assert audit_rows(engine) == []


async def test_a_vm_seen_deleted_that_is_back_counts_again_and_is_never_destroyed(
    settings: Settings, pve: Any, engine: Engine
) -> None:
    back = task("back")
    add_vm_row(engine, back, 160, deleted=True)
    vm = leak(pve, 160, back)

    report = await reconcile(settings, fix=False)
    assert kinds(report) == [(Kind.RETURNED_VM, back, 160)]
    assert report.exit_code == 1

    report = await reconcile(settings, fix=True)
    assert report.lines()[0].endswith(": counted again")
    assert vm in pve.vms
    assert vm_row(engine, back).deleted_at is None
    assert (await reconcile(settings, fix=True)).drift.findings == []
    assert writes(pve) == []


# ------------------------------------------------------------------------ deletions left half done


def begin_deletion(engine: Engine, task_id: str, vmid: int) -> str:
    """The record marked as being deleted, as DELETE vms/{vmid} marks it; the deletion's task id."""
    deletion = deletion_task_id(task_id)
    vms.begin_deletion(engine, "alice", vmid, deletion)
    return deletion


@pytest.mark.usefixtures("worker")
async def test_a_deletion_terminated_after_the_destroy_is_finished_and_its_quota_comes_back(
    settings: Settings, api: httpx.AsyncClient, temporal: Client, pve: Any, engine: Engine
) -> None:
    big = {"cpuCores": 4, "memorySize": 8192, "diskSize": 100}  # half of alice's totals
    first = (await create(api, name="big-1", **big)).json()["data"]
    assert (await create(api, name="big-2", **big)).json()["message"] == MSG_CREATED
    # Its deletion destroyed the VM, then was terminated before it gave the resources back.
    deletion = begin_deletion(engine, first["task_id"], int(first["vmid"]))
    pve.vms.remove(pve.vm(int(first["vmid"])))
    await ended(temporal, deletion)
    refused = await create(api, name="big-3", **big)
    assert (refused.status_code, refused.json()["message"]) == (400, MSG_TOTAL_LIMIT)

    report = await reconcile(settings, fix=False)
    assert kinds(report) == [(Kind.UNFINISHED_DELETION, first["task_id"], int(first["vmid"]))]
    assert report.lines()[0] == (
        f"VM {first['vmid']} on pve2 (task {first['task_id']}, alice) is gone from PVE, but its deletion ended "
        f"before giving its resources back ({deletion} workflow terminated)"
    )
    assert report.exit_code == 1
    assert vm_row(engine, first["task_id"]).deleted_at is None

    report = await reconcile(settings, fix=True)
    assert report.lines()[0].endswith(": marked deleted")
    assert report.exit_code == 0
    row = vm_row(engine, first["task_id"])
    assert row.deleted_at is not None
    assert row.deleting_task_id == deletion, "deleted by that deletion, as one that ends well leaves it"
    [audit] = [(r.kind, r.action, r.task_id, r.detail) for r in audit_rows(engine)]
    assert audit == ("unfinished deletion", "marked deleted", first["task_id"], f"{deletion} workflow terminated")

    assert (await create(api, name="big-3", **big)).json()["message"] == MSG_CREATED
    assert (await reconcile(settings, fix=False)).drift.findings == []


@pytest.mark.usefixtures("worker")
async def test_a_deletion_terminated_before_the_destroy_leaves_the_vm_deletable_again(
    settings: Settings, api: httpx.AsyncClient, temporal: Client, pve: Any, engine: Engine
) -> None:
    made = (await create(api)).json()["data"]
    deletion = begin_deletion(engine, made["task_id"], int(made["vmid"]))
    await ended(temporal, deletion)
    written = writes(pve)

    report = await reconcile(settings, fix=True)

    assert kinds(report) == [(Kind.STALE_DELETION_MARK, made["task_id"], int(made["vmid"]))]
    assert report.lines()[0].endswith(": mark cleared, it may be deleted again")
    row = vm_row(engine, made["task_id"])
    assert (row.deleted_at, row.deleting_task_id) == (None, None)
    assert [vm.vmid for vm in created_vms(pve)] == [int(made["vmid"])]
    assert writes(pve) == written, "PVE is not touched"
    listed = (await api.get("/api/v1/vm/manage/vms", headers=auth())).json()["data"]["vms"]
    assert [vm["deleting"] for vm in listed] == [False]
    assert (await reconcile(settings, fix=True)).drift.findings == []


@pytest.mark.parametrize(
    ("state", "on_pve", "kind", "warnings"),
    [
        (WorkflowState("terminated"), False, Kind.UNFINISHED_DELETION, 0),
        (WorkflowState("timed out"), True, Kind.STALE_DELETION_MARK, 0),
        (RUNNING, False, None, 0),  # the deletion ends the record's life itself
        (RUNNING, True, None, 0),
        (NOT_FOUND, True, None, 1),  # no evidence: the mark stays
        (NOT_FOUND, False, Kind.VANISHED_VM, 1),  # gone altogether is evidence enough for the record itself
        (WorkflowState("unknown", "Temporal: deadline exceeded"), False, Kind.VANISHED_VM, 1),
    ],
)
def test_only_a_deletion_known_to_be_over_without_success_is_repaired(
    state: WorkflowState, on_pve: bool, kind: Kind | None, warnings: int
) -> None:
    record = VmRecord("clone-a-1", "alice", 101, "pve2", "web", deleting_task_id="delete-clone-a-1")
    drift = find_drift(
        observed(
            records_before=[record],
            records={"clone-a-1": record},
            pve_vms=[PveVm(101, "pve2", "web", "stopped", "clone-a-1")] if on_pve else [],
            present={101: "pve2"} if on_pve else {},
            workflows={"delete-clone-a-1": state},
        )
    )
    assert [f.kind for f in drift.findings] == ([kind] if kind else [])
    assert len(drift.warnings) == warnings
    assert all(f.deletion == "delete-clone-a-1" for f in drift.findings if f.kind is not Kind.VANISHED_VM)


# ------------------------------------------------------------------------------- refusals


async def test_an_empty_database_refuses_while_pve_shows_marked_vms(
    settings: Settings, temporal: Client, pve: Any, engine: Engine
) -> None:
    """Pointed at a new (or wrong) database, every VM of the service looks unowned: nothing is done."""
    leaked = [task() for _ in range(3)]
    await ended(temporal, *leaked)  # the strongest evidence there is, and still nothing is destroyed
    vms = [leak(pve, 150 + i, t) for i, t in enumerate(leaked)]

    report = await reconcile(settings, fix=False)
    assert report.exit_code == 2
    assert (
        "--fix would refuse: the database holds no VM records at all while PVE shows 3 VMs carrying the service's "
        "marker: a new or wrong database (is DATABASE_URL right?)"
    ) in report.lines()

    report = await reconcile(settings, fix=True)
    assert report.exit_code == 2
    assert report.lines()[-2].startswith("refused: the database holds no VM records at all")
    assert report.lines()[-1].startswith("3 findings (orphan VM: 3): refused, nothing done")
    assert all(f.repaired is None for f in report.drift.findings)
    assert all(vm in pve.vms for vm in vms)
    assert writes(pve) == []
    assert audit_rows(engine) == []


@pytest.mark.usefixtures("seen_before")
async def test_more_orphans_than_max_destroy_are_refused_until_it_is_raised(
    settings: Settings, temporal: Client, pve: Any, engine: Engine
) -> None:
    leaked = [task() for _ in range(6)]
    await ended(temporal, *leaked)
    vms = [leak(pve, 150 + i, t) for i, t in enumerate(leaked)]
    with session(engine) as db, db.begin():  # something else to repair: also left as it is
        db.add(Reservation(task_id=leaked[0], username="bob", cores=1, memory_mb=512, disk_gb=10, vmid=150))

    report = await reconcile(settings, fix=True)
    assert report.exit_code == 2
    assert (
        "refused: it would destroy 6 VMs, more than --max-destroy 5: check them above, then run again with "
        "--max-destroy 6"
    ) in report.lines()
    assert all(vm in pve.vms for vm in vms)
    assert writes(pve) == []
    assert [r.state for r in reservations(engine)] == [HELD]
    assert audit_rows(engine) == []

    report = await reconcile(settings, fix=True, max_destroy=6)
    assert report.exit_code == 0
    assert sorted(f.repaired or "" for f in report.drift.findings) == ["destroyed"] * 6 + ["released"]
    assert created_vms(pve) == []


async def test_a_missing_database_is_refused_and_never_created(
    settings: Settings, temporal: Client, pve: Any, tmp_path: Path, cli: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    leaked = task()
    await ended(temporal, leaked)
    vm = leak(pve, 150, leaked)
    nowhere = tmp_path / "nowhere" / "app.db"
    settings.database_url = SecretStr(f"sqlite:///{nowhere}")

    for argv in (["reconcile"], ["reconcile", "--fix"], ["reconcile", "--history"]):
        assert await cli(*argv) == 2
        out, err = capsys.readouterr()
        assert out == ""
        assert err == (
            f"boxctl: refused, nothing done: database sqlite:///{nowhere} does not exist (no file {nowhere}): "
            "is DATABASE_URL right?\n"
        )
    assert not nowhere.parent.exists()
    assert vm in pve.vms and writes(pve) == []

    # Each reason on its own line: a missing database and a namespace that does not exist.
    settings.temporal_namespace = "no-such-namespace"
    assert await cli("reconcile", "--fix") == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and "does not exist (no file" in lines[0]
    assert lines[1] == (
        f"boxctl: refused, nothing done: Temporal namespace 'no-such-namespace' does not exist at "
        f"{settings.temporal_address}: is TEMPORAL_NAMESPACE right?"
    )
    assert not nowhere.parent.exists()


async def test_a_database_without_the_current_schema_is_refused_and_left_as_it_is(
    settings: Settings, pve: Any, tmp_path: Path, cli: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()  # a database file without tables
    settings.database_url = SecretStr(f"sqlite:///{empty}")

    assert await cli("reconcile", "--fix") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"boxctl: refused, nothing done: database sqlite:///{empty} has no tables yet")
    with sqlite3.connect(empty) as db:
        assert db.execute("SELECT name FROM sqlite_master").fetchall() == []  # no schema was created


@pytest.mark.usefixtures("seen_before")
async def test_a_namespace_that_does_not_exist_is_refused(
    settings: Settings, temporal: Client, pve: Any, cli: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    leaked = task()
    await ended(temporal, leaked)
    vm = leak(pve, 150, leaked)
    settings.temporal_namespace = "no-such-namespace"

    assert await cli("reconcile", "--fix") == 2
    assert capsys.readouterr().err == (
        f"boxctl: refused, nothing done: Temporal namespace 'no-such-namespace' does not exist at "
        f"{settings.temporal_address}: is TEMPORAL_NAMESPACE right?\n"
    )
    assert vm in pve.vms and writes(pve) == []


# ------------------------------------------------------------------------------------ audit


@pytest.mark.usefixtures("seen_before")
async def test_every_action_of_fix_is_audited_and_listed(
    settings: Settings, temporal: Client, pve: Any, engine: Engine, cli: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    gone, vanished, back = task("gone"), task("vanished"), task("back")
    await ended(temporal, gone)
    leak(pve, 150, gone)
    add_reservation(engine, gone, 150, username="bob")
    with session(engine) as db, db.begin():
        db.add(CloneSlot(task_id=gone, node="pve1", storage="NFS"))
    add_vm_row(engine, vanished, 161)  # not on PVE
    add_vm_row(engine, back, 160, deleted=True)
    leak(pve, 160, back)

    assert await cli("reconcile", "--fix") == 0
    out = capsys.readouterr().out
    for done in (": destroyed", ": released", ": freed", ": marked deleted", ": counted again"):
        assert done in out

    rows = [(r.kind, r.action, r.task_id, r.vmid, r.username, r.detail) for r in audit_rows(engine)]
    assert sorted(rows) == sorted(
        [
            ("orphan VM", "destroyed", gone, 150, "", "workflow terminated"),
            ("stale reservation", "released", gone, 150, "bob", "workflow terminated"),
            ("stale clone slot", "freed", gone, None, "", "workflow terminated"),
            ("VM seen deleted", "marked deleted", vanished, 161, "alice", "VM 'web'"),
            ("VM back on PVE", "counted again", back, 160, "alice", "VM 'leak'"),
        ]
    )
    assert all(r.at is not None for r in audit_rows(engine))

    assert await cli("reconcile", "--history", "2") == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[0].split() == ["AT", "KIND", "ACTION", "TASK", "VMID", "NODE", "USER", "DETAIL"]
    assert len(listed) == 3  # the last two actions
    last = audit_rows(engine)[-1]
    assert last.action in listed[-1] and last.task_id in listed[-1]


# ----------------------------------------------------------------------------- read-only run


@pytest.mark.usefixtures("worker")
async def test_without_fix_nothing_changes(
    settings: Settings, api: httpx.AsyncClient, temporal: Client, pve: Any, engine: Engine
) -> None:
    made = (await create(api)).json()["data"]
    pve.vms.remove(pve.vm(int(made["vmid"])))
    leaked, gone = task(), task("gone")
    await ended(temporal, leaked, gone)
    orphan = leak(pve, 150, leaked)
    not_ours(pve)
    add_reservation(engine, gone, 121, username="bob")
    before_vms = [(vm.vmid, vm.node, vm.status, dict(vm.config)) for vm in pve.vms]
    before_rows = (
        [r.model_dump() for r in vm_records(engine)],
        sorted((r.task_id, r.state) for r in reservations(engine)),
    )
    pve.requests.clear()

    for _ in range(2):
        report = await reconcile(settings, fix=False)
        assert sorted(f.kind.value for f in report.drift.findings) == sorted(
            [Kind.ORPHAN_VM, Kind.STALE_RESERVATION, Kind.VANISHED_VM]
        )
        assert report.exit_code == 1
        assert all(f.repaired is None for f in report.drift.findings)

    assert writes(pve) == []
    assert [(vm.vmid, vm.node, vm.status, dict(vm.config)) for vm in pve.vms] == before_vms
    assert orphan in pve.vms
    after_rows = (
        [r.model_dump() for r in vm_records(engine)],
        sorted((r.task_id, r.state) for r in reservations(engine)),
    )
    assert after_rows == before_rows
    assert audit_rows(engine) == []


# ----------------------------------------------------------------------------------------- CLI


@pytest.mark.usefixtures("seen_before")
async def test_boxctl_reconcile(
    settings: Settings,
    temporal: Client,
    pve: Any,
    engine: Engine,
    cli: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    leaked = task()
    await ended(temporal, leaked)
    orphan = leak(pve, 150, leaked)

    assert await cli("reconcile") == 1
    out = capsys.readouterr().out
    assert f"orphan VM 150 on pve2 (task {leaked}): no successful task owns it" in out
    assert "run with --fix to repair" in out
    assert orphan in pve.vms

    assert await cli("reconcile", "--fix", "--max-destroy", "0") == 2
    assert "refused: it would destroy 1 VMs, more than --max-destroy 0" in capsys.readouterr().out
    assert orphan in pve.vms

    assert await cli("reconcile", "--fix") == 0
    assert ": destroyed" in capsys.readouterr().out
    assert orphan not in pve.vms

    assert await cli("reconcile") == 0
    assert capsys.readouterr().out.startswith("consistent: ")

    # PVE unreachable: a failure, not a clean bill of health.
    settings.pve_port = 1
    assert await cli("reconcile") == 1
    assert capsys.readouterr().err.startswith("boxctl: cannot list the VMs on PVE")
    assert [r.task_id for r in vm_records(engine)] == [OLD_TASK]


# ------------------------------------------------------------------------------ find_drift alone


def observed(**overrides: Any) -> Observed:
    values: dict[str, Any] = {
        "records_before": [VmRecord(OLD_TASK, "alice", 199, "pve2", "old", deleted=True)],
        "held": [],
        "pve_vms": [],
        "unreadable": {},
        "workflows": {},
        "records": {},
    }
    values.update(overrides)
    return Observed(**values)


def test_find_drift_leaves_alone_what_it_cannot_tell() -> None:
    vm = PveVm(150, "pve2", "leak", "stopped", "clone-x-1")
    unknown = WorkflowState("unknown", "Temporal: deadline exceeded")
    record = VmRecord("clone-y-1", "alice", 101, "pve1", "web")
    drift = find_drift(
        observed(
            pve_vms=[vm],
            held=[HeldReservation("clone-x-1", "alice", 150)],
            workflows={"clone-x-1": unknown},
            records_before=[record],
            records={"clone-y-1": record},
            unreadable={101: "config of VM 101 on pve1 unreadable: 595 no route to host"},
        )
    )
    assert drift.findings == []
    assert len(drift.warnings) == 3


def test_find_drift_never_takes_an_owned_or_running_vm_for_an_orphan() -> None:
    owned = VmRecord("clone-a-1", "alice", 101, "pve2", "web")
    copy = PveVm(130, "pve1", "copy-of-web", "running", "clone-a-1")  # cloned by hand on PVE: same marker
    running = PveVm(131, "pve1", "new", "stopped", "clone-b-1", lock="clone")
    gone = PveVm(132, "pve1", "old", "stopped", "clone-c-1")
    drift = find_drift(
        observed(
            pve_vms=[copy, running, gone, PveVm(101, "pve2", "web", "running", "clone-a-1")],
            workflows={"clone-b-1": RUNNING, "clone-c-1": WorkflowState("failed")},
            records_before=[owned],
            records={"clone-a-1": owned},
        )
    )
    assert [(f.kind, f.vmid) for f in drift.findings] == [(Kind.ORPHAN_VM, 132)]
    assert drift.warnings == []


@pytest.mark.parametrize(
    ("status", "reservation", "orphan"),
    [
        ("failed", None, True),
        ("canceled", HELD, True),
        ("terminated", HELD, True),
        ("timed out", None, True),
        ("not found", RELEASED, True),  # the run gave up and cleaned up; its history is past retention
        ("completed", COMMITTED, False),  # made and recorded its VM: never an orphan
        ("completed", None, False),
        ("not found", HELD, False),  # may be running in another namespace
        ("not found", COMMITTED, False),
        ("not found", None, False),  # neither Temporal nor the database knows the task
        ("continued as new", None, False),
        ("running", HELD, False),
    ],
)
def test_only_a_run_known_to_be_over_without_success_leaves_an_orphan(
    status: str, reservation: str | None, orphan: bool
) -> None:
    vm = PveVm(150, "pve2", "leak", "stopped", "clone-x-1")
    state = NOT_FOUND if status == "not found" else WorkflowState(status)
    reservations = {"clone-x-1": reservation} if reservation else {}
    drift = find_drift(observed(pve_vms=[vm], workflows={"clone-x-1": state}, reservations=reservations))
    assert [(f.kind, f.vmid) for f in drift.findings] == ([(Kind.ORPHAN_VM, 150)] if orphan else [])
    assert len(drift.warnings) == (0 if orphan or status == "running" else 1)
    assert drift.refusals == []


def test_a_stale_clone_slot_needs_the_same_evidence_a_completed_run_included() -> None:
    workflows = {"clone-a-1": WorkflowState("completed"), "clone-b-1": NOT_FOUND, "clone-c-1": NOT_FOUND}
    drift = find_drift(
        observed(
            clone_slots=["clone-a-1", "clone-b-1", "clone-c-1"],
            workflows=workflows,
            reservations={"clone-b-1": HELD, "clone-c-1": RELEASED},
        )
    )
    assert [(f.kind, f.task_id) for f in drift.findings] == [
        (Kind.STALE_CLONE_SLOT, "clone-a-1"),
        (Kind.STALE_CLONE_SLOT, "clone-c-1"),
    ]
    [warning] = drift.warnings
    assert warning.startswith("the clone slot of task clone-b-1 (held or queued for) is left alone: ")


def test_a_stale_clone_slot_names_its_owner() -> None:
    drift = find_drift(
        observed(
            clone_slots=["clone-a-1", "clone-b-1", "clone-c-1"],
            clone_slot_owners={"clone-a-1": "alice", "clone-b-1": "bob", "clone-c-1": ""},  # c: queued before 0005
            workflows={"clone-a-1": WorkflowState("completed"), "clone-b-1": NOT_FOUND, "clone-c-1": NOT_FOUND},
            reservations={"clone-b-1": HELD, "clone-c-1": RELEASED},
        )
    )
    lines = [f.line() for f in drift.findings]
    assert lines[0].startswith("stale clone slot of task clone-a-1 (alice): held or queued")
    assert lines[1].startswith("stale clone slot of task clone-c-1: held or queued")
    assert [f.username for f in drift.findings] == ["alice", ""]  # the audit row's user
    [warning] = drift.warnings
    assert warning.startswith("the clone slot of task clone-b-1 (bob, held or queued for) is left alone: ")


def test_refusals() -> None:
    vms = [PveVm(150 + i, "pve2", "leak", "stopped", f"clone-x-{i}") for i in range(3)]
    failed = {vm.task_id: WorkflowState("failed") for vm in vms}
    assert find_drift(observed(pve_vms=vms, workflows=failed), max_destroy=3).refusals == []
    [too_many] = find_drift(observed(pve_vms=vms, workflows=failed), max_destroy=2).refusals
    assert too_many.startswith("it would destroy 3 VMs, more than --max-destroy 2")
    # No VM record at all, not even a deleted one, while PVE shows marked VMs: even one that is running.
    running = {vm.task_id: RUNNING for vm in vms}
    [empty] = find_drift(observed(pve_vms=vms, workflows=running, records_before=[])).refusals
    assert empty.startswith("the database holds no VM records at all while PVE shows 3 VMs")
    assert find_drift(observed(records_before=[])).refusals == []
