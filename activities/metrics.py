"""The worker's metrics: the Temporal SDK's own (`temporal_...`) and the service's (`pveboxes_...`), on one
Prometheus endpoint, WORKER_METRICS_PORT.

The SDK's runtime telemetry serves the endpoint; the service's metrics are made through the runtime's meter so
they land on it too. In a workflow that is `workflow.metric_meter()`, which records nothing while a run is
replayed (a worker that picks a run up again after a restart or an eviction does not count its end twice).
Names here are without the `_total` of counters: the exporter adds it (`counters_total_suffix`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime

from sqlalchemy import Engine, func
from sqlmodel import select
from temporalio import workflow
from temporalio.common import MetricMeter
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig

from db.engine import session
from db.models import CloneSlot, CloneWaiter, Template

log = logging.getLogger(__name__)

CREATIONS = "pveboxes_creations"  # {result}: succeeded, failed, cancelled; once per run end
CLONE_SECONDS = "pveboxes_clone_seconds"  # from the slot taken to the clone done
# How long each run waited for its clone slot: the count under the first bucket is the runs that found one free.
CLONE_SLOT_WAIT_SECONDS = "pveboxes_clone_slot_wait_seconds"
CLONE_SLOT_WAITING = "pveboxes_clone_slot_waiting"  # {node, storage}: runs in the queue now
PVE_ERRORS = "pveboxes_pve_errors"  # {kind}: transient (retried), final
# A full clone of a real disk takes from seconds (linked storage, small disk) to most of an hour.
CLONE_SECONDS_BUCKETS = (5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)
SLOT_WAIT_BUCKETS = (1.0, *CLONE_SECONDS_BUCKETS)
WAITING_INTERVAL_SECONDS = 5.0


def metrics_runtime(port: int) -> Runtime:
    """A runtime whose telemetry serves /metrics on `port` (all interfaces: Prometheus scrapes from elsewhere)."""
    return Runtime(
        telemetry=TelemetryConfig(
            metrics=PrometheusConfig(
                bind_address=f"0.0.0.0:{port}",
                counters_total_suffix=True,
                # The SDK's latencies in seconds, like every other Prometheus histogram (and ours).
                durations_as_seconds=True,
                histogram_bucket_overrides={
                    CLONE_SECONDS: CLONE_SECONDS_BUCKETS,
                    CLONE_SLOT_WAIT_SECONDS: SLOT_WAIT_BUCKETS,
                },
            )
        )
    )


# In a workflow (CreateFromBoxWorkflow): workflow time, and the replay-safe meter.


def count_creation(result: str) -> None:
    workflow.metric_meter().create_counter(CREATIONS, "Creation runs ended, by result").add(1, {"result": result})


def record_slot_wait(since: datetime) -> datetime:
    """Record the wait for a clone slot that began at `since`; returns now, when the clone begins."""
    now = workflow.now()
    histogram = workflow.metric_meter().create_histogram_float(CLONE_SLOT_WAIT_SECONDS, "Clone slot wait", "s")
    histogram.record((now - since).total_seconds())
    return now


def record_clone(since: datetime) -> None:
    seconds = (workflow.now() - since).total_seconds()
    workflow.metric_meter().create_histogram_float(CLONE_SECONDS, "Clone time, slot taken to VM made", "s").record(
        seconds
    )


# In the worker process.


def pve_error_counter(meter: MetricMeter) -> Callable[[str], None]:
    """What PveClient calls with the kind of each PVE error it raises (pve/ knows nothing of Temporal)."""
    counter = meter.create_counter(PVE_ERRORS, "PVE API requests that failed, by kind (transient: retried)")
    return lambda kind: counter.add(1, {"kind": kind})


def waiting_for_clone_slots(engine: Engine, default_storage: str) -> dict[tuple[str, str], int]:
    """Runs queued for a clone slot, by (template node, target storage): 0 for every template's node on the
    default storage and for every line with a clone running, so that the gauge reads 0 from the start rather
    than nothing until someone first waits. The database is the deployment's and its task queue's: the queue
    rows are the one account of who waits that survives worker restarts, where an up/down counter in the
    workflow would be lost with the worker that counted it."""
    with session(engine) as db:
        template_nodes = db.exec(select(Template.node).distinct()).all()
        cloning = db.exec(select(CloneSlot.node, CloneSlot.storage).distinct()).all()
        rows = db.exec(
            select(CloneWaiter.node, CloneWaiter.storage, func.count()).group_by(CloneWaiter.node, CloneWaiter.storage)
        ).all()
    counts = dict.fromkeys([(node, default_storage) for node in template_nodes], 0)
    counts.update(dict.fromkeys([(node, storage) for node, storage in cloning], 0))
    counts.update({(node, storage): count for node, storage, count in rows})
    return counts


async def report_clone_slot_waiting(
    engine: Engine, meter: MetricMeter, default_storage: str, interval: float = WAITING_INTERVAL_SECONDS
) -> None:
    """Keep the `pveboxes_clone_slot_waiting` gauge current, until cancelled."""
    gauge = meter.create_gauge(CLONE_SLOT_WAITING, "Runs waiting for a clone slot")
    seen: set[tuple[str, str]] = set()
    while True:
        try:
            counts = await asyncio.to_thread(waiting_for_clone_slots, engine, default_storage)
        except Exception:
            log.warning("could not count the clone slot queue", exc_info=True)
        else:
            # A line that emptied reads 0, not its last value.
            for node, storage in seen | set(counts):
                gauge.set(counts.get((node, storage), 0), {"node": node, "storage": storage})
            seen |= set(counts)
        await asyncio.sleep(interval)
