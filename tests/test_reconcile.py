"""`boxctl reconcile`: orphan VMs, stale reservations and VMs deleted on PVE are reported, repaired with --fix,
and nothing else is ever touched. Against a real Temporal dev server, a fake PVE and the real database."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine
from sqlmodel import select
from temporalio.client import Client

import boxctl
import settings as settings_module
from db import clone_slots
from db.engine import session
from db.models import COMMITTED, HELD, RELEASED, CloneGrant, CloneSlot, CloneWaiter, Reservation, Vm
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

CREATE = "/api/v1/vm/manage/createFromBoxTemplate"


def leak(pve: Any, vmid: int = 150, task_id: str = "clone-x-1", **kwargs: Any) -> Any:
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


def kinds(report: Report) -> list[tuple[Kind, str, int | None]]:
    return [(f.kind, f.task_id, f.vmid) for f in report.drift.findings]


async def create(api: httpx.AsyncClient, **overrides: Any) -> httpx.Response:
    return await api.post(CREATE + "?wait=30", json=body(**overrides), headers=auth())


# --------------------------------------------------------------------------------- orphan VMs


@pytest.mark.usefixtures("engine")
async def test_orphan_vm_is_reported_then_destroyed_and_nothing_else_is_touched(settings: Settings, pve: Any) -> None:
    orphan = leak(pve, status="running")
    others = not_ours(pve)

    report = await reconcile(settings, fix=False)
    assert kinds(report) == [(Kind.ORPHAN_VM, "clone-x-1", 150)]
    lines = report.lines()
    assert lines[0] == "orphan VM 150 on pve2 (task clone-x-1): no successful task owns it (workflow not found)"
    assert lines[-1].startswith("1 findings (orphan VM: 1): run with --fix to repair")
    assert report.exit_code == 1
    assert orphan in pve.vms
    assert writes(pve) == []

    report = await reconcile(settings, fix=True)
    assert report.lines()[0].endswith("(workflow not found): destroyed")
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


@pytest.mark.usefixtures("engine")
async def test_a_locked_orphan_is_left_until_the_lock_is_gone(settings: Settings, pve: Any) -> None:
    orphan = leak(pve)
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


@pytest.mark.usefixtures("one_clone_per_node", "worker")
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
    """The runs in line behind a stale slot ended between reconcile's look and its repair (no workflow runs
    under their ids now): the slot goes down the line past them, and none is left held."""
    with session(engine) as db, db.begin():
        db.add(CloneSlot(task_id="clone-gone-1", node="pve1", storage="NFS"))
    for waiter in ("clone-gone-2", "clone-gone-3"):
        assert not clone_slots.acquire(engine, waiter, "pve1", "NFS", clone_slots.Limits(per_node=1, per_storage=0))

    finding = Finding(Kind.STALE_CLONE_SLOT, "clone-gone-1")
    assert await free_clone_slot(finding, temporal, engine, settings) == "freed"
    with session(engine) as db:
        assert db.exec(select(CloneSlot)).all() == []
        assert db.exec(select(CloneWaiter)).all() == []
        assert db.exec(select(CloneGrant)).all() == []


# ------------------------------------------------------------------------------- reservations


async def test_a_held_reservation_without_workflow_is_released(settings: Settings, pve: Any, engine: Engine) -> None:
    with session(engine) as db, db.begin():
        db.add(Reservation(task_id="clone-gone-1", username="alice", cores=2, memory_mb=2048, disk_gb=20, vmid=120))

    report = await reconcile(settings, fix=False)
    assert kinds(report) == [(Kind.STALE_RESERVATION, "clone-gone-1", 120)]
    assert report.lines()[0] == (
        "stale reservation of task clone-gone-1 (alice, VMID 120): held, but its workflow is not running "
        "(workflow not found)"
    )
    assert report.exit_code == 1
    assert [r.state for r in reservations(engine)] == [HELD]

    report = await reconcile(settings, fix=True)
    assert report.lines()[0].endswith(": released")
    assert report.exit_code == 0
    assert [r.state for r in reservations(engine)] == [RELEASED]
    assert (await reconcile(settings, fix=True)).drift.findings == []
    assert writes(pve) == []


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


async def test_a_vm_seen_deleted_that_is_back_counts_again_and_is_never_destroyed(
    settings: Settings, pve: Any, engine: Engine
) -> None:
    with session(engine) as db, db.begin():
        db.add(
            Vm(
                task_id="clone-back-1",
                username="alice",
                vmid=160,
                node="pve2",
                name="restored",
                cores=2,
                memory_mb=2048,
                disk_gb=20,
                deleted_at=datetime.now(UTC),
            )
        )
    vm = leak(pve, 160, "clone-back-1")

    report = await reconcile(settings, fix=False)
    assert kinds(report) == [(Kind.RETURNED_VM, "clone-back-1", 160)]
    assert report.exit_code == 1

    report = await reconcile(settings, fix=True)
    assert report.lines()[0].endswith(": counted again")
    assert vm in pve.vms
    assert vm_row(engine, "clone-back-1").deleted_at is None
    assert (await reconcile(settings, fix=True)).drift.findings == []
    assert writes(pve) == []


# ----------------------------------------------------------------------------- read-only run


@pytest.mark.usefixtures("worker")
async def test_without_fix_nothing_changes(
    settings: Settings, api: httpx.AsyncClient, pve: Any, engine: Engine
) -> None:
    made = (await create(api)).json()["data"]
    pve.vms.remove(pve.vm(int(made["vmid"])))
    orphan = leak(pve)
    not_ours(pve)
    with session(engine) as db, db.begin():
        db.add(Reservation(task_id="clone-gone-1", username="bob", cores=1, memory_mb=512, disk_gb=10, vmid=121))
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


# ----------------------------------------------------------------------------------------- CLI


async def test_boxctl_reconcile(
    settings: Settings, pve: Any, engine: Engine, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("database_url", "temporal_address", "temporal_namespace", "pve_host", "pve_user", "pve_password"):
        monkeypatch.setenv(name.upper(), str(getattr(settings, name)))
    monkeypatch.setenv("PVE_PORT", str(settings.pve_port))
    monkeypatch.setenv("PVE_CA_FILE", settings.pve_ca_file)
    settings_module.get_settings.cache_clear()
    try:
        orphan = leak(pve)

        assert await asyncio.to_thread(boxctl.main, ["reconcile"]) == 1
        out = capsys.readouterr().out
        assert "orphan VM 150 on pve2 (task clone-x-1): no successful task owns it" in out
        assert "run with --fix to repair" in out
        assert orphan in pve.vms

        assert await asyncio.to_thread(boxctl.main, ["reconcile", "--fix"]) == 0
        assert ": destroyed" in capsys.readouterr().out
        assert orphan not in pve.vms

        assert await asyncio.to_thread(boxctl.main, ["reconcile"]) == 0
        assert capsys.readouterr().out.startswith("consistent: ")

        # PVE unreachable: a refusal, not a clean bill of health.
        monkeypatch.setenv("PVE_PORT", "1")
        settings_module.get_settings.cache_clear()
        assert await asyncio.to_thread(boxctl.main, ["reconcile"]) == 1
        assert capsys.readouterr().err.startswith("boxctl: cannot list the VMs on PVE")
    finally:
        settings_module.get_settings.cache_clear()
    assert vm_records(engine) == []


# ------------------------------------------------------------------------------ find_drift alone


def observed(**overrides: Any) -> Observed:
    values: dict[str, Any] = {
        "records_before": [],
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
            workflows={"clone-b-1": RUNNING, "clone-c-1": NOT_FOUND},
            records_before=[owned],
            records={"clone-a-1": owned},
        )
    )
    assert [(f.kind, f.vmid) for f in drift.findings] == [(Kind.ORPHAN_VM, 132)]
    assert drift.warnings == []
