"""The bare Temporal baselines: the least a sandboxed workflow can do for the same shape of work, on the same
Temporal server and the same fakepve.

python -m bench.baseline --address 127.0.0.1:7233 --task-queue bench-baseline --pve-port 8006 --pve-ca ca.pem \
    --db baseline.db

- BareAdmissionWorkflow: started with update-with-start; runs one local activity, and its `admitted` update
  answers once that is done (what the service's admission does, less the work itself). Figure 3.
- BareCheckedAdmissionWorkflow: the same, its local activity doing the least any admission does before it can
  answer with the seed's codes (AdmissionWork: one `cluster/resources` read, one transaction holding a VMID).
  Figure 3b.
- BareCreationWorkflow: the creation's own shape. Update-with-start, the update answered after one local
  activity; then local, remote, local, remote, local steps, the two remote activities doing the creation's PVE
  work with plain proxmoxer (1: the clone, its UPID watched until done; 2: cores and memory, then the disk's
  resize, watched). No database, no checks, no heartbeats, no state published. Figures 4 and 4a.

Both run in the SDK's sandbox with this module and proxmoxer passed through (as the product passes its own
modules), on a worker process of their own with synchronous activities on a thread pool, like the product's.
It logs in to PVE once and keeps its ticket, like the product's worker. Prints `baseline worker ready` once it
polls.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

with workflow.unsafe.imports_passed_through():
    from proxmoxer import ProxmoxAPI

READY = "baseline worker ready"
TEMPLATE_NODE, TEMPLATE_VMID = "pve1", 9000  # dev/fakepve_cluster.py's template
# The looks at a PVE task at the service's own pace (pve/tasks.py): one at 0.05 s, then from 0.25 s on; a
# floor that looked sooner would measure the pace of the looks, not the cost of the machinery.
FIRST_LOOK, POLL = 0.05, 0.25
ACTIVITY_THREADS = 64
FIRST_HELD_VMID = 700000  # AdmissionWork's VMIDs: far from the script's (100000 on) and BareCreation's (500000 on)
STEP = timedelta(seconds=30)


@dataclass
class BareCreation:
    vmid: int
    name: str
    target: str
    storage: str
    cores: int
    memory_mb: int
    disk_gb: int


@activity.defn
def noop(step: int) -> int:
    return step


class PveWork:
    """The creation's PVE work with proxmoxer and nothing else (the product's is activities/pve.py)."""

    def __init__(self, host: str, port: int, ca_file: str, user: str = "root@pam", password: str = "secret"):
        self._login = {"host": host, "port": port, "user": user, "password": password, "verify_ssl": ca_file}
        self._api: Any = None
        self._lock = threading.Lock()

    def api(self) -> Any:
        with self._lock:
            if self._api is None:
                self._api = ProxmoxAPI(**self._login)
            return self._api

    def watch(self, upid: str) -> None:
        node = upid.split(":")[1]
        started = time.monotonic()
        look_at = FIRST_LOOK
        while True:
            time.sleep(max(0.0, started + look_at - time.monotonic()))
            status = self.api().nodes(node).tasks(upid).status.get()
            if status.get("status") == "stopped":
                if status.get("exitstatus") != "OK":
                    raise RuntimeError(f"PVE task {upid} failed: {status.get('exitstatus')}")
                return
            look_at = POLL if look_at < POLL else look_at + POLL

    @activity.defn
    def clone(self, req: BareCreation) -> None:
        upid = (
            self.api()
            .nodes(TEMPLATE_NODE)
            .qemu(TEMPLATE_VMID)
            .clone.post(newid=req.vmid, name=req.name, full=1, target=req.target, storage=req.storage)
        )
        self.watch(upid)

    @activity.defn
    def configure(self, req: BareCreation) -> None:
        vm = self.api().nodes(req.target).qemu(req.vmid)
        vm.config.put(cores=req.cores, memory=req.memory_mb)
        upid = vm.resize.put(disk="scsi0", size=f"{req.disk_gb}G")
        if upid:
            self.watch(upid)


class AdmissionWork:
    """What any admission of this service's kind must do before it can answer with the seed's codes, with plain
    tools and nothing else: one `cluster/resources` read (the template, node and storage checks and the free
    VMIDs all need it) and one write transaction that holds the lowest free VMID (SQLite in WAL mode, committed
    to disk, as the product's default database). No box, plan, quota or clone slot."""

    def __init__(self, pve: PveWork, db_path: str):
        self._pve = pve
        self._db_path = db_path
        self._connections = threading.local()  # sqlite3 connections stay on the thread that opened them

    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._connections, "db", None)
        if db is None:
            db = sqlite3.connect(self._db_path, isolation_level=None, timeout=30)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS hold (task_id TEXT PRIMARY KEY, vmid INTEGER UNIQUE NOT NULL)")
            self._connections.db = db
        return db

    @activity.defn
    def admit(self, task_id: str) -> int:
        resources = self._pve.api().cluster.resources.get()
        on_pve = {int(r["vmid"]) for r in resources if r.get("type") in ("qemu", "lxc")}
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            held = {vmid for (vmid,) in db.execute("SELECT vmid FROM hold")}
            vmid = next(v for v in itertools.count(FIRST_HELD_VMID) if v not in on_pve and v not in held)
            db.execute("INSERT INTO hold (task_id, vmid) VALUES (?, ?)", (task_id, vmid))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return vmid


def _local(step: int) -> Any:
    return workflow.execute_local_activity(noop, step, start_to_close_timeout=STEP)


@workflow.defn
class BareAdmissionWorkflow:
    def __init__(self) -> None:
        self._admitted = False

    @workflow.update
    async def admitted(self) -> bool:
        await workflow.wait_condition(lambda: self._admitted)
        return True

    @workflow.run
    async def run(self) -> None:
        await _local(0)
        self._admitted = True
        await workflow.wait_condition(workflow.all_handlers_finished)


class _AnswersVmid:
    """The `admitted` update both bare workflows answer with the VMID once their admission has fixed it."""

    def __init__(self) -> None:
        self._vmid: int | None = None

    @workflow.update
    async def admitted(self) -> int:
        await workflow.wait_condition(lambda: self._vmid is not None)
        assert self._vmid is not None
        return self._vmid


@workflow.defn
class BareCheckedAdmissionWorkflow(_AnswersVmid):
    @workflow.run
    async def run(self) -> None:
        self._vmid = await workflow.execute_local_activity_method(
            AdmissionWork.admit, workflow.info().workflow_id, start_to_close_timeout=STEP
        )
        await workflow.wait_condition(workflow.all_handlers_finished)


@workflow.defn
class BareCreationWorkflow(_AnswersVmid):
    @workflow.run
    async def run(self, req: BareCreation) -> int:
        await _local(0)  # the admission
        self._vmid = req.vmid
        await _local(1)  # the clone slot
        await workflow.execute_activity_method(PveWork.clone, req, start_to_close_timeout=timedelta(minutes=2))
        await _local(2)  # the slot freed
        await workflow.execute_activity_method(PveWork.configure, req, start_to_close_timeout=timedelta(minutes=2))
        await _local(3)  # the record
        await workflow.wait_condition(workflow.all_handlers_finished)
        return req.vmid


async def serve(args: argparse.Namespace) -> None:
    # The classes of `bench.baseline`, not of `__main__` (`python -m` runs this file under that name): the
    # sandbox imports a workflow's module afresh for each run unless it is passed through, and `__main__` is not.
    from bench import baseline

    client = await Client.connect(args.address)
    pve = baseline.PveWork(args.pve_host, args.pve_port, args.pve_ca)
    admission = baseline.AdmissionWork(pve, args.db)
    with ThreadPoolExecutor(max_workers=ACTIVITY_THREADS) as executor:
        worker = Worker(
            client,
            task_queue=args.task_queue,
            workflows=[
                baseline.BareAdmissionWorkflow,
                baseline.BareCheckedAdmissionWorkflow,
                baseline.BareCreationWorkflow,
            ],
            activities=[baseline.noop, admission.admit, pve.clone, pve.configure],
            activity_executor=executor,
            workflow_runner=SandboxedWorkflowRunner(
                restrictions=SandboxRestrictions.default.with_passthrough_modules("bench", "proxmoxer")
            ),
            max_concurrent_activities=ACTIVITY_THREADS,
            max_concurrent_local_activities=ACTIVITY_THREADS,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with worker:
            print(READY, flush=True)
            await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True)
    parser.add_argument("--task-queue", default="bench-baseline")
    parser.add_argument("--pve-host", default="127.0.0.1")
    parser.add_argument("--pve-port", type=int, required=True)
    parser.add_argument("--pve-ca", required=True, help="fakepve's CA certificate")
    parser.add_argument("--db", required=True, help="AdmissionWork's SQLite file (made if missing)")
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
