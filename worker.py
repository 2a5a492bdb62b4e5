"""The Temporal worker: CreateFromBoxWorkflow and all its activities, on TEMPORAL_TASK_QUEUE."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

from sqlalchemy import Engine
from temporalio.client import Client
from temporalio.worker import Worker

from activities.admission import AdmissionActivities
from activities.creation import CreationActivities
from activities.db import DbActivities
from activities.lab import LabActivities
from activities.metrics import metrics_runtime, pve_error_counter, report_clone_slot_waiting
from activities.pve import PveActivities
from activities.vm_life import VmLifeActivities
from db.clone_slots import Limits
from db.engine import make_engine
from db.schema import SchemaError, require_current
from logs import configure_logging
from pve.client import PveClient
from settings import Settings, SettingsError, get_settings
from temporal_client import connect_temporal, ensure_search_attributes
from workflows import CreateFromBoxWorkflow, DeleteVmWorkflow, LabWorkflow, PowerVmWorkflow
from workflows.clone_turns import tell_slot_granted
from workflows.runner import workflow_runner

log = logging.getLogger("worker")

# Activities are synchronous (proxmoxer, SQLAlchemy); they run on this many threads. A thread is held only
# while a PVE or database call is under way: waiting for long PVE tasks happens between activity attempts.
ACTIVITY_THREADS = 64
PROJECT_MODULES = ("workflows", "payloads", "activities", "db", "pve")


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
    creation = CreationActivities(pve_activities, db_activities, asyncio.get_running_loop())
    admission = AdmissionActivities(db_activities, pve_activities, pve_read_threads=ACTIVITY_THREADS)
    lab = LabActivities(db_activities, pve_activities, client)
    vm_life = VmLifeActivities(pve, engine)
    return Worker(
        client,
        task_queue=task_queue,
        workflows=[CreateFromBoxWorkflow, DeleteVmWorkflow, PowerVmWorkflow, LabWorkflow],
        activities=[
            admission.admit,
            lab.admit_lab,
            lab.retry_target,
            lab.release_lab,
            lab.earlier_creation,
            db_activities.reassign_vmid,
            db_activities.try_clone_slot,
            db_activities.release_clone_slot,
            db_activities.commit_creation,
            db_activities.release_quota,
            creation.start_clone,
            creation.configure_vm,
            pve_activities.inspect_template,
            pve_activities.await_task,
            pve_activities.await_clone_by_lock,
            pve_activities.start_vm,
            pve_activities.vm_addresses,
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
        workflow_runner=workflow_runner(PROJECT_MODULES),
        max_concurrent_activities=ACTIVITY_THREADS,
        max_concurrent_local_activities=ACTIVITY_THREADS,
        # The SDK sends at most one heartbeat per 0.8 x the heartbeat timeout (8 s of the workflow's 10 s),
        # which leaves a busy worker 2 s of slack. Each heartbeat of activities/heartbeats.py (every 2 s) goes out.
        max_heartbeat_throttle_interval=timedelta(seconds=2),
    )


# The collector's youngest generation is collected once this many more container objects were allocated than freed.
# The default, 700, collected about once a creation, though reference counting frees almost all a creation makes;
# 5,000 keeps each such collection short (4 ms at most, measured; 20,000 gave pauses of 17 ms).
GC_FIRST_GENERATION = 5_000


def settle_garbage_collector() -> None:
    """Once started, leave what the worker imported out of every later collection (gc.freeze), and collect the
    youngest generation less often. Measured with a gc.callbacks timer in the worker, 300 instant creations by 8
    clients (figure 4's load, longer): the collector's time fell from 1.0 ms to 0.2 ms of the worker's CPU per
    creation, and its longest pause from 115 ms (a full collection, two in such a run) to 12-21 ms (one
    collection of the middle generation). BENCHMARKS.md has the figures, and figure 5a the worker's memory."""
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(GC_FIRST_GENERATION, middle, oldest)


async def main() -> None:
    settings = get_settings()
    configure_logging(settings.log_format)
    engine = make_engine(settings.database_url)
    # Before it takes any run: a worker on tables of another schema version, without its PVE user or with
    # unreadable Temporal TLS files would fail the runs it takes; it refuses to start instead, saying why.
    try:
        require_current(engine)
        runtime = metrics_runtime(settings.worker_metrics_port) if settings.worker_metrics_port else None
        pve = PveClient(settings, pve_error_counter(runtime.metric_meter) if runtime else None)
        client = await connect_temporal(settings, runtime)
    except (SettingsError, SchemaError) as exc:
        log.error("%s", exc)
        raise SystemExit(1) from None
    except ValueError as exc:  # the SDK's "Failed starting Prometheus exporter": the port is taken
        log.error("metrics on port %s: %s", settings.worker_metrics_port, exc)
        raise SystemExit(1) from None
    background: set[asyncio.Task[None]] = set()  # held: the loop keeps only weak references to tasks
    if runtime is not None:
        log.info("metrics on http://0.0.0.0:%s/metrics", settings.worker_metrics_port)
        background.add(
            asyncio.create_task(report_clone_slot_waiting(engine, runtime.metric_meter, settings.default_storage))
        )
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
        settle_garbage_collector()
        async with worker:
            log.info("worker polling task queue %r on %s", settings.temporal_task_queue, settings.temporal_address)
            await stop.wait()
        for task in background:
            task.cancel()
        log.info("worker stopped")


if __name__ == "__main__":
    asyncio.run(main())
