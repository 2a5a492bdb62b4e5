"""The chaos suite: real worker and API processes against fakepve with its fault injection, worker kills,
a Temporal server restart and an API restart, with deletions (DELETE vms/{vmid}), cancels (POST
tasks/{id}/cancel) and labs (POST labs, one of them cancelled) among the creations. After every phase: every
task ended, every deletion succeeded; the VMs on PVE are exactly the succeeded creations minus the deleted
ones, each once; no reservation, clone slot or deletion mark is left without a live run; the quota arithmetic
is exact; and `boxctl reconcile` finds nothing to repair."""

from __future__ import annotations

import asyncio
import json
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine
from sqlmodel import select
from temporalio.client import Client, WorkflowExecutionStatus

from db import quota
from db.engine import session
from db.load import load_admin_data
from db.models import COMMITTED, HELD, CloneGrant, CloneSlot
from dev.fakepve_cluster import TEMPLATE_VMID
from dev.stack import HOST, Proc, Stack, free_port, settings_env
from payloads import LAB_VM_MEMO_KEY, OWNER_MARK
from reconcile import reconcile
from settings import Settings
from tests.conftest import created_vms, reservations, vm_records
from tests.factories import BOX, auth, body

pytestmark = [
    pytest.mark.slow,
    pytest.mark.fakepve(time_scale=1),
    pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True),
]

API = "/api/v1/vm/manage"
CREATE = f"{API}/createFromBoxTemplate"
SUMMARY = Path(__file__).resolve().parent.parent / "var" / "chaos-summary-{}.json"


@dataclass
class Ledger:
    """What the suite asked for and what came of it."""

    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)  # task_id -> request
    refused: Counter[int] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    phase_seconds: dict[str, float] = field(default_factory=dict)
    phase_started: float = field(default_factory=time.monotonic)

    def phase_done(self, name: str) -> None:
        now = time.monotonic()
        self.phase_seconds[name] = round(now - self.phase_started, 1)
        self.phase_started = now

    succeeded: dict[str, int] = field(default_factory=dict)  # task_id -> vmid
    ended: set[str] = field(default_factory=set)
    deletions: dict[str, str] = field(default_factory=dict)  # deletion task id -> the creation's task id
    deleted: set[str] = field(default_factory=set)  # creations whose VM a deletion removed
    labs: dict[str, dict[str, Any]] = field(default_factory=dict)  # lab task id -> request

    @property
    def alive(self) -> dict[str, int]:
        """The succeeded creations whose VM is not deleted: task_id -> vmid."""
        return {task_id: vmid for task_id, vmid in self.succeeded.items() if task_id not in self.deleted}


class Cluster:
    """Two workers, one API process and a restartable Temporal server around the test's fakepve."""

    def __init__(self, settings: Settings, tmp: Path):
        self.settings = settings
        self.tmp = tmp
        self.processes = Stack(tmp)
        self.temporal_port = free_port()
        settings.temporal_address = f"{HOST}:{self.temporal_port}"
        self.temporal: Proc | None = None
        self.workers: list[Proc] = []
        self.api: Proc | None = None
        self.client: Client | None = None
        self.restarts = 0

    async def start(self) -> None:
        self.temporal = self.processes.temporal(self.tmp / "temporal.db", self.temporal_port, log_level="error")
        await self.temporal.ready()
        for _ in range(100):  # the port opens before the frontend is healthy
            try:
                self.client = await Client.connect(self.settings.temporal_address)
                break
            except RuntimeError:
                await asyncio.sleep(0.3)
        assert self.client, "the Temporal dev server did not become healthy"
        self.workers = [self.new_worker(), self.new_worker()]
        await self.start_api()

    def new_worker(self) -> Proc:
        self.restarts += 1
        return self.processes.worker(settings_env(self.settings), f"worker{self.restarts}")

    async def start_api(self) -> None:
        self.api = self.processes.api(settings_env(self.settings), free_port(), f"api{self.restarts}")
        await self.api.ready()

    async def restart_temporal(self) -> None:
        """Start the stopped Temporal server again, on its port and its database file."""
        assert self.temporal
        self.temporal.start()
        await self.temporal.ready()

    def kill_worker(self, index: int) -> None:
        self.workers[index].kill()
        self.workers[index] = self.new_worker()

    def stop(self) -> None:
        self.processes.stop()


@pytest.fixture
async def cluster(settings: Settings, engine: Engine, tmp_path: Path) -> AsyncIterator[Cluster]:
    settings.admission_timeout_seconds = 10
    settings.pve_timeout_seconds = 2
    load_admin_data(
        engine,
        {
            "plans": [
                {
                    "id": "big",
                    "name": "Big",
                    "per_vm": {"cores": 4, "memory_mb": 8192, "disk_gb": 100},
                    "total": {"cores": 1000, "memory_mb": 1000000, "disk_gb": 100000},
                }
            ],
            "users": [{"username": "alice", "plan": "big"}],
        },
    )
    cluster = Cluster(settings, tmp_path)
    try:
        await cluster.start()
        yield cluster
    finally:
        cluster.stop()


async def create(cluster: Cluster, ledger: Ledger, n: int, **overrides: Any) -> list[str]:
    """n creations at once through the API process; returns the admitted task ids."""
    assert cluster.api
    requests = [
        body(
            name=f"chaos-{len(ledger.tasks) + i}-{random.randrange(10**6)}",
            cpuCores=1,
            memorySize=512,
            diskSize=10,
            storage="ceph",
            **overrides,
        )
        for i in range(n)
    ]
    async with httpx.AsyncClient(timeout=60) as client:
        answers = await asyncio.gather(
            *(client.post(cluster.api.url + CREATE, json=r, headers=auth()) for r in requests),
            return_exceptions=True,
        )
    admitted = []
    for request, answer in zip(requests, answers, strict=True):
        if isinstance(answer, BaseException):
            ledger.refused[0] += 1  # the API process itself was down: nothing may come of it either
            continue
        if answer.status_code == 200:
            task_id = answer.json()["data"]["task_id"]
            ledger.tasks[task_id] = request
            admitted.append(task_id)
        else:
            assert answer.status_code == 503, answer.text  # the only refusal a fitting request may get
            ledger.refused[answer.status_code] += 1
    return admitted


async def create_lab(cluster: Cluster, ledger: Ledger, count: int) -> str | None:
    """A lab of `count` VMs through the API process; its creations join the ledger when it has ended."""
    assert cluster.api
    request = {
        "box_id": BOX,
        "name": f"lab-{len(ledger.labs)}-{random.randrange(10**6)}",
        "count": count,
        "cpuCores": 1,
        "memorySize": 512,
        "diskSize": 10,
        "storage": "ceph",
    }
    async with httpx.AsyncClient(timeout=60) as client:
        answer = await client.post(f"{cluster.api.url}{API}/labs", json=request, headers=auth())
    if answer.status_code != 200:
        assert answer.status_code == 503, answer.text
        ledger.refused[503] += 1
        return None
    task_id: str = answer.json()["data"]["task_id"]
    ledger.labs[task_id] = request
    return task_id


async def delete(cluster: Cluster, ledger: Ledger, n: int) -> None:
    """n of the VMs made so far (and not being deleted) deleted at once through the API process."""
    assert cluster.api
    chosen = random.sample(sorted(set(ledger.succeeded) - set(ledger.deletions.values())), n)
    async with httpx.AsyncClient(timeout=60) as client:
        answers = await asyncio.gather(
            *(client.delete(f"{cluster.api.url}{API}/vms/{ledger.succeeded[t]}", headers=auth()) for t in chosen)
        )
    for task_id, answer in zip(chosen, answers, strict=True):
        assert answer.status_code == 200, answer.text
        ledger.deletions[answer.json()["data"]["task_id"]] = task_id


async def cancel(cluster: Cluster, ledger: Ledger, task_id: str) -> None:
    """Cancel a creation through the API process; one that has just ended answers 409, and is what it is."""
    assert cluster.api
    async with httpx.AsyncClient(timeout=60) as client:
        answer = await client.post(f"{cluster.api.url}{API}/tasks/{task_id}/cancel", headers=auth())
    assert answer.status_code in (200, 409), answer.text
    ledger.faults["cancel" if answer.status_code == 200 else "cancel of a run that had ended"] += 1


async def settle(cluster: Cluster, ledger: Ledger, timeout: float = 240) -> None:
    """Wait until every admitted run and every deletion has ended, and record how."""
    assert cluster.client
    pending = [t for t in [*ledger.tasks, *ledger.deletions, *ledger.labs] if t not in ledger.ended]
    deadline = asyncio.get_running_loop().time() + timeout
    while pending:
        assert asyncio.get_running_loop().time() < deadline, f"runs still going: {pending}"
        still = []
        for task_id in pending:
            description = await cluster.client.get_workflow_handle(task_id).describe()
            if description.status == WorkflowExecutionStatus.RUNNING:
                still.append(task_id)
                continue
            outcome = description.status.name.lower() if description.status else "unknown"
            ledger.ended.add(task_id)
            if task_id in ledger.labs:
                ledger.outcomes[f"lab {outcome}"] += 1
                # Its VMs' creations (the last try of each) are creations like the others, ended with the lab; one
                # cancelled may never have started (and then held nothing that the invariants would not see).
                lab = ledger.labs[task_id]
                for vm in lab_vms(await description.memo()):
                    if vm["status"] == "cancelled":
                        continue
                    ledger.tasks[vm["task_id"]] = {k: lab[k] for k in ("cpuCores", "memorySize", "diskSize")}
                    still.append(vm["task_id"])
                continue
            if task_id in ledger.deletions:
                ledger.outcomes[f"deletion {outcome}"] += 1
                if description.status == WorkflowExecutionStatus.COMPLETED:
                    ledger.deleted.add(ledger.deletions[task_id])
                continue
            ledger.outcomes[outcome] += 1
            if description.status == WorkflowExecutionStatus.COMPLETED:
                result = await cluster.client.get_workflow_handle(task_id).result()
                ledger.succeeded[task_id] = result["vmid"]
        pending = still
        if pending:
            await asyncio.sleep(0.5)


def lab_vms(memo: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A lab's VMs as its memo keeps them (workflows/lab.py), each under a key of its own."""
    return [memo[key] for key in sorted(memo) if LAB_VM_MEMO_KEY.fullmatch(key)]


def check_invariants(pve: Any, engine: Engine, ledger: Ledger) -> None:
    vms = created_vms(pve)
    # Every deletion succeeded, PVE faults and kills notwithstanding.
    assert ledger.deleted == set(ledger.deletions.values()), set(ledger.deletions.values()) - ledger.deleted
    # The VMs on PVE are exactly the succeeded creations minus the deleted ones, each once.
    alive = ledger.alive
    owners = Counter(str(vm.config.get("description", "")).removeprefix(OWNER_MARK) for vm in vms)
    assert all(count == 1 for count in owners.values()), owners
    assert set(owners) == set(alive), set(owners) ^ set(alive)
    assert sorted(vm.vmid for vm in vms) == sorted(alive.values())
    assert all(vm.lock is None for vm in vms)
    # No reservation, clone slot or deletion mark without a live run; records match PVE.
    assert reservations(engine, HELD) == []
    committed = {r.task_id for r in reservations(engine, COMMITTED)}
    assert committed == set(ledger.succeeded)
    records = vm_records(engine)
    # A record of a creation that did not succeed exists only when a cancellation undid the creation just as its
    # record was written (the workflow task that wrote it failed): the undo took it back, it counts for nothing.
    undone = [v for v in records if v.task_id not in ledger.succeeded]
    assert all(v.deleted_at is not None for v in undone), undone
    ledger.faults["records written, then undone by a cancel"] = len(undone)
    records = [v for v in records if v.task_id in ledger.succeeded]
    assert {v.task_id: v.vmid for v in records} == ledger.succeeded
    assert {v.task_id for v in records if v.deleted_at is not None} == ledger.deleted
    assert [v.task_id for v in records if v.deleted_at is None and v.deleting_task_id is not None] == []
    with session(engine) as db:
        assert db.exec(select(CloneSlot)).all() == []
        assert db.exec(select(CloneGrant)).all() == []
    # The quota arithmetic is exact: what counts is what succeeded and was not deleted.
    usage = quota.usage_of_user(engine, "alice")
    asked = [ledger.tasks[t] for t in alive]
    assert (usage.vms, usage.cores, usage.memory_mb, usage.disk_gb) == (
        len(asked),
        sum(r["cpuCores"] for r in asked),
        sum(r["memorySize"] for r in asked),
        sum(r["diskSize"] for r in asked),
    )


def after(seconds: float, action: Callable[[], None]) -> None:
    threading.Timer(seconds, action).start()


async def test_chaos(cluster: Cluster, settings: Settings, pve: Any, engine: Engine) -> None:
    random.seed(2026)
    ledger = Ledger()
    pve.add_ceph_storage("ceph")
    pve.ceph_slow(1)  # each clone takes 1 s: faults and kills land in the middle of runs
    assert pve.vm(TEMPLATE_VMID)

    # 1. A flaky network, and a worker SIGKILLed during the clones.
    pve.flaky_network(drop_rate=0.08)  # at random: fakepve seeds its dice only at start
    ledger.faults["flaky network (8% of requests dropped)"] += 1
    await create(cluster, ledger, 6)
    await create_lab(cluster, ledger, 4)
    await asyncio.sleep(0.5)
    cluster.kill_worker(0)
    ledger.faults["worker SIGKILL"] += 1
    await settle(cluster, ledger)
    pve.flaky_network()
    check_invariants(pve, engine, ledger)
    ledger.phase_done("1 flaky network, worker kill, a lab")

    # 2. Lock timeouts and 5xx on clone and configuration, and the other worker killed.
    pve.fail("POST", "/clone", 500, "can't lock file '/var/lock/pve-manager/pve-storage-ceph' - got timeout", times=3)
    pve.fail("PUT", "/config", 503, "Service Unavailable", times=3)
    ledger.faults["storage lock timeouts"] += 3
    ledger.faults["HTTP 503"] += 3
    admitted = await create(cluster, ledger, 6)
    await delete(cluster, ledger, 2)
    await asyncio.sleep(0.3)
    if admitted:
        await cancel(cluster, ledger, admitted[-1])
    await asyncio.sleep(0.9)
    cluster.kill_worker(1)
    ledger.faults["worker SIGKILL"] += 1
    await settle(cluster, ledger)
    pve.failures.clear()
    check_invariants(pve, engine, ledger)
    ledger.phase_done("2 lock timeouts, 5xx, deletions, a cancel, worker kill")

    # 3. The target node offline and the cluster without quorum, for a few seconds each.
    await create(cluster, ledger, 6)
    await delete(cluster, ledger, 2)
    pve.set_node_offline("pve2")
    after(3, lambda: pve.set_node_offline("pve2", offline=False))
    ledger.faults["target node offline 3 s"] += 1
    await asyncio.sleep(0.3)
    pve.lose_quorum()
    after(2, pve.regain_quorum)
    ledger.faults["quorum lost 2 s"] += 1
    pve.revoke_tickets()
    ledger.faults["ticket expired"] += 1
    await settle(cluster, ledger)
    check_invariants(pve, engine, ledger)
    ledger.phase_done("3 node offline, quorum lost, ticket expired, deletions")

    # 4. The Temporal server restarted (file-backed) and the API process restarted, with runs in flight.
    await create(cluster, ledger, 6)
    await create_lab(cluster, ledger, 3)
    await delete(cluster, ledger, 2)
    await asyncio.sleep(0.5)
    assert cluster.temporal
    cluster.temporal.stop()
    ledger.faults["Temporal server restart"] += 1
    assert cluster.api
    cluster.api.stop()
    ledger.faults["API process restart"] += 1
    await asyncio.sleep(1)
    await cluster.restart_temporal()
    await cluster.start_api()
    await create(cluster, ledger, 3)
    await settle(cluster, ledger)
    check_invariants(pve, engine, ledger)
    ledger.phase_done("4 Temporal and API restarts, deletions, a lab")

    # 5. Permanent faults: the clone refused, then the configuration refused; and cancellations mid-clone.
    pve.fail("POST", "/clone", error="permission_denied")
    ledger.faults["clone refused (403)"] += 1
    await create(cluster, ledger, 2)
    await settle(cluster, ledger)
    pve.failures.clear()
    pve.fail("PUT", "/config", 400, "Parameter verification failed.")
    ledger.faults["configuration refused (400)"] += 1
    await create(cluster, ledger, 2)
    await settle(cluster, ledger)
    pve.failures.clear()
    for task_id in await create(cluster, ledger, 3):
        await asyncio.sleep(0.3)
        await cancel(cluster, ledger, task_id)
    lab = await create_lab(cluster, ledger, 4)
    if lab:
        await asyncio.sleep(1.5)
        await cancel(cluster, ledger, lab)
    await settle(cluster, ledger)
    check_invariants(pve, engine, ledger)
    ledger.phase_done("5 permanent faults, cancels, a lab cancelled")

    # The safety net agrees: nothing to repair.
    report = await reconcile(settings, fix=False)
    assert report.exit_code == 0, "\n".join(report.lines())

    summary = {
        "admitted": len(ledger.tasks),
        "deletions": len(ledger.deletions),
        "labs": len(ledger.labs),
        "refused_503": ledger.refused[503],
        "api_unreachable": ledger.refused[0],
        "outcomes": dict(ledger.outcomes),
        "faults": dict(ledger.faults),
        "vms_on_pve": len(created_vms(pve)),
        "phase_seconds": ledger.phase_seconds,
    }
    path = Path(str(SUMMARY).format(engine.dialect.name))
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2), file=sys.stderr)
    assert ledger.outcomes["completed"] >= 20  # the transient faults did not cost creations
