"""Metrics, scraped as Prometheus scrapes them: the worker's one endpoint (the Temporal SDK's metrics and the
service's) before and after a known number of creations, and the API's GET /metrics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from sqlalchemy import Engine, delete
from temporalio.client import WorkflowFailureError

from activities.metrics import metrics_runtime, pve_error_counter, report_clone_slot_waiting
from db.engine import session
from db.load import load_admin_data
from db.models import CloneWaiter
from dev.stack import free_port
from pve.client import PveClient
from settings import Settings
from temporal_client import connect_temporal
from tests.conftest import created_vms, result_of
from tests.factories import auth, body
from tests.waiting import until, until_async
from worker import ACTIVITY_THREADS, build_worker

CREATE = "/api/v1/vm/manage/createFromBoxTemplate"
TASKS = "/api/v1/vm/manage/tasks"


def scrape(text: str, name: str, **labels: str) -> list[Sample]:
    """The samples called `name` whose labels include `labels`."""
    return [
        sample
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    ]


def value(text: str, name: str, **labels: str) -> float:
    return sum(sample.value for sample in scrape(text, name, **labels))


@pytest.fixture
async def metrics_url(settings: Settings, engine: Engine) -> AsyncIterator[str]:
    """A worker wired as worker.py's main wires it, its metrics on a free port: the URL to scrape."""
    port = free_port()
    runtime = metrics_runtime(port)
    client = await connect_temporal(settings, runtime)
    pve = PveClient(settings, pve_error_counter(runtime.metric_meter))
    waiting = asyncio.create_task(
        report_clone_slot_waiting(engine, runtime.metric_meter, settings.default_storage, interval=0.2)
    )
    with ThreadPoolExecutor(max_workers=ACTIVITY_THREADS) as executor:
        async with build_worker(client, settings.temporal_task_queue, engine, pve, settings, executor):
            yield f"http://127.0.0.1:{port}/metrics"
    waiting.cancel()


async def get(url: str) -> str:
    async with httpx.AsyncClient() as http:
        response = await http.get(url)
    assert response.status_code == 200
    return response.text


async def create(api: httpx.AsyncClient, **overrides: Any) -> str:
    response = await api.post(CREATE, json=body(**overrides), headers=auth())
    assert response.status_code == 200, response.text
    return str(response.json()["data"]["task_id"])


@pytest.mark.fakepve(time_scale=1)
async def test_the_worker_and_the_api_count_creations_by_result_clone_times_and_admissions(
    api: httpx.AsyncClient, metrics_url: str, settings: Settings, temporal: Any, pve: Any
) -> None:
    mine = {"task_queue": settings.temporal_task_queue}
    before = await get(metrics_url)
    assert scrape(before, "pveboxes_creations_total", **mine) == []
    # The SDK's own metrics, on the same port.
    assert any(family.name.startswith("temporal_") for family in text_string_to_metric_families(before))

    for name in ("web-1", "web-2"):
        await result_of(temporal, await create(api, name=name))
    pve.fail("POST", "/nodes/pve1/qemu/9000/clone", error="clone_failed", times=1)
    with pytest.raises(WorkflowFailureError):
        await result_of(temporal, await create(api, name="web-3"))
    pve.add_ceph_storage("ceph")
    pve.ceph_slow(3)  # the clone onto ceph takes 3 s: long enough to cancel it
    cancelled = await create(api, name="web-4", storage="ceph")
    await until(lambda: any(vm.lock == "clone" for vm in created_vms(pve)))
    assert (await api.post(f"{TASKS}/{cancelled}/cancel", headers=auth())).status_code == 200
    with pytest.raises(WorkflowFailureError):
        await result_of(temporal, cancelled)

    after = await get(metrics_url)
    creations = {
        result: value(after, "pveboxes_creations_total", result=result, **mine)
        for result in ("succeeded", "failed", "cancelled")
    }
    assert creations == {"succeeded": 2, "failed": 1, "cancelled": 1}
    # Every run got a slot (no limit reached: none queued long); only the two that succeeded finished a clone.
    assert value(after, "pveboxes_clone_slot_wait_seconds_count", **mine) == 4
    assert value(after, "pveboxes_clone_slot_wait_seconds_bucket", le="1", **mine) == 4
    assert value(after, "pveboxes_clone_seconds_count", **mine) == 2
    assert value(after, "pveboxes_pve_errors_total", kind="final") >= 1  # the refused clone
    assert value(after, "temporal_workflow_completed_total", workflow_type="CreateFromBoxWorkflow", **mine) == 2

    api_metrics = await api.get("/metrics")  # no token
    assert api_metrics.status_code == 200
    text = api_metrics.text
    assert value(text, "pveboxes_api_requests_total", method="POST", route=CREATE, status="200") == 4
    assert value(text, "pveboxes_api_admission_seconds_count", status="200") == 4
    cancels = value(text, "pveboxes_api_requests_total", method="POST", route=f"{TASKS}/{{task_id}}/cancel")
    assert cancels == 1


async def test_the_api_counts_refusals_and_unknown_paths_and_keeps_metrics_out_of_its_openapi(
    api: httpx.AsyncClient,
) -> None:
    assert (await api.post(CREATE, json=body())).status_code == 401
    assert (await api.get("/no/such/path")).status_code == 404
    text = (await api.get("/metrics")).text
    assert value(text, "pveboxes_api_requests_total", method="POST", route=CREATE, status="401") == 1
    assert value(text, "pveboxes_api_admission_seconds_count", status="401") == 1
    assert value(text, "pveboxes_api_requests_total", route="unmatched", status="404") == 1
    assert "/metrics" not in (await api.get("/openapi.json")).json()["paths"]


async def test_the_refusals_a_creation_expects_are_not_counted_as_pve_errors(
    api: httpx.AsyncClient, metrics_url: str, temporal: Any, pve: Any, engine: Engine
) -> None:
    """A started VM's guest agent answers PVE's 500 until the guest has booted, and the run asks again: a healthy
    creation, which the error metric must not show as failing. A refused clone still counts."""
    from tests.test_ready_vm import READY_BOX, ready_box

    load_admin_data(engine, {"boxes": [ready_box()]})
    pve.pools["course-101"] = set()
    pve.guest_boot_seconds = 1.5  # the agent refuses the run's first looks
    await result_of(temporal, await create(api, box_id=READY_BOX))
    [vm] = created_vms(pve)
    assert vm.status == "running"
    assert any(command == "network-get-interfaces" for command, _ in vm.agent_requests)  # asked, once booted
    after = await get(metrics_url)
    assert value(after, "pveboxes_pve_errors_total", kind="final") == 0

    pve.fail("POST", "/nodes/pve1/qemu/9000/clone", error="clone_failed", times=1)
    with pytest.raises(WorkflowFailureError):
        await result_of(temporal, await create(api, name="refused"))
    assert value(await get(metrics_url), "pveboxes_pve_errors_total", kind="final") == 1


async def test_the_clone_slot_queue_reads_zero_from_the_start_and_counts_each_line(
    metrics_url: str, engine: Engine
) -> None:
    """`pveboxes_clone_slot_waiting` is there before anyone waits (0 for the template's node on the default
    storage: an alert on it sees 0, not nothing), counts the queue's rows by line, and reads 0 again once a
    line has emptied."""

    async def waiting(node: str, storage: str) -> list[float]:
        text = await get(metrics_url)
        return [s.value for s in scrape(text, "pveboxes_clone_slot_waiting", node=node, storage=storage)]

    await until_async(lambda: waiting("pve1", "NFS"), [0])
    with session(engine) as db, db.begin():
        for n in range(2):
            db.add(CloneWaiter(task_id=f"clone-waits-{n}", node="pve1", storage="NFS", owner="alice"))
        db.add(CloneWaiter(task_id="clone-waits-ceph", node="pve1", storage="ceph", owner="alice"))
    await until_async(lambda: waiting("pve1", "NFS"), [2])
    await until_async(lambda: waiting("pve1", "ceph"), [1])
    with session(engine) as db, db.begin():
        db.execute(delete(CloneWaiter))
    await until_async(lambda: waiting("pve1", "NFS"), [0])
    await until_async(lambda: waiting("pve1", "ceph"), [0])
