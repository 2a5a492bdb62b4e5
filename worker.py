"""The Temporal worker: CreateFromBoxWorkflow and all its activities, on TEMPORAL_TASK_QUEUE."""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

from sqlalchemy import Engine
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest, ListSearchAttributesRequest
from temporalio.client import Client
from temporalio.common import SearchAttributeKey
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from activities.admission import AdmissionActivities
from activities.db import DbActivities
from activities.pve import PveActivities
from activities.vm_life import VmLifeActivities
from db.clone_slots import Limits
from db.engine import make_engine
from db.schema import SchemaError, require_current
from pve.client import PveClient
from settings import Settings, SettingsError, get_settings
from temporal_client import connect_temporal
from workflows import SEARCH_ATTRIBUTES, CreateFromBoxWorkflow, DeleteVmWorkflow, PowerVmWorkflow
from workflows.clone_turns import tell_slot_granted

log = logging.getLogger("worker")

# Activities are synchronous (proxmoxer, SQLAlchemy); they run on this many threads. A thread is held only
# while a PVE or database call is under way: waiting for long PVE tasks happens between activity attempts.
ACTIVITY_THREADS = 64
PROJECT_MODULES = ("workflows", "payloads", "activities", "db", "pve")


async def ensure_search_attributes(
    client: Client, namespace: str, keys: Sequence[SearchAttributeKey] = SEARCH_ATTRIBUTES
) -> None:
    """Register the workflow's custom search attributes if the server does not know them yet."""
    existing = await client.operator_service.list_search_attributes(ListSearchAttributesRequest(namespace=namespace))
    missing = {
        key.name: IndexedValueType.ValueType(key.indexed_value_type)
        for key in keys
        if key.name not in existing.custom_attributes
    }
    if missing:
        try:
            await client.operator_service.add_search_attributes(
                AddSearchAttributesRequest(namespace=namespace, search_attributes=missing)
            )
        except RPCError as exc:
            # Another worker starting at the same moment registered them first.
            if exc.status != RPCStatusCode.ALREADY_EXISTS and "already exists" not in str(exc):
                raise
        log.info("registered search attributes %s", sorted(missing))


def build_worker(
    client: Client,
    task_queue: str,
    engine: Engine,
    pve: PveClient,
    settings: Settings,
    executor: ThreadPoolExecutor,
) -> Worker:
    clone_limits = Limits(settings.clone_limit_per_node, settings.clone_limit_per_storage)
    db_activities = DbActivities(engine, clone_limits, functools.partial(tell_slot_granted, client))
    pve_activities = PveActivities(pve, settings.default_storage)
    admission = AdmissionActivities(db_activities, pve_activities)
    vm_life = VmLifeActivities(pve, engine)
    return Worker(
        client,
        task_queue=task_queue,
        workflows=[CreateFromBoxWorkflow, DeleteVmWorkflow, PowerVmWorkflow],
        activities=[
            admission.admit,
            db_activities.reassign_vmid,
            db_activities.try_clone_slot,
            db_activities.release_clone_slot,
            db_activities.commit_creation,
            db_activities.release_quota,
            pve_activities.inspect_template,
            pve_activities.start_clone,
            pve_activities.await_task,
            pve_activities.await_clone_by_lock,
            pve_activities.configure_vm,
            pve_activities.destroy_vm,
            vm_life.begin_deletion,
            vm_life.stop_for_deletion,
            vm_life.destroy_for_deletion,
            vm_life.finish_deletion,
            vm_life.abandon_deletion,
            vm_life.power_vm,
        ],
        activity_executor=executor,
        # The sandbox would import the project's modules afresh for every run (a third of the worker's CPU per
        # creation, measured with `make bench`); they are passed through instead. The sandbox still guards the
        # standard library, and the replay tests (tests/histories) catch a workflow change that breaks old runs.
        workflow_runner=SandboxedWorkflowRunner(
            restrictions=SandboxRestrictions.default.with_passthrough_modules(*PROJECT_MODULES)
        ),
        max_concurrent_activities=ACTIVITY_THREADS,
        max_concurrent_local_activities=ACTIVITY_THREADS,
        # The SDK sends at most one heartbeat per 0.8 x the heartbeat timeout (8 s of the workflow's 10 s),
        # which leaves a busy worker 2 s of slack. Each heartbeat of activities/heartbeats.py (every 2 s) goes out.
        max_heartbeat_throttle_interval=timedelta(seconds=2),
    )


async def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    engine = make_engine(settings.database_url)
    # Before it takes any run: a worker on tables of another schema version, without its PVE user or with
    # unreadable Temporal TLS files would fail the runs it takes; it refuses to start instead, saying why.
    try:
        require_current(engine)
        pve = PveClient(settings)
        client = await connect_temporal(settings)
    except (SettingsError, SchemaError) as exc:
        log.error("%s", exc)
        raise SystemExit(1) from None
    await ensure_search_attributes(client, settings.temporal_namespace)
    with ThreadPoolExecutor(max_workers=ACTIVITY_THREADS) as executor:
        worker = build_worker(
            client,
            settings.temporal_task_queue,
            engine,
            pve,
            settings,
            executor,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with worker:
            log.info("worker polling task queue %r on %s", settings.temporal_task_queue, settings.temporal_address)
            await stop.wait()
        log.info("worker stopped")


if __name__ == "__main__":
    asyncio.run(main())
