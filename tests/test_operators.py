"""What operators see and do in Temporal: runs found by each search attribute (visibility queries), the Web UI's
summary and details of every run, its current details while it waits, and `temporal workflow reset` of a
failed creation driven through the CLI."""

from __future__ import annotations

import asyncio
import subprocess
import time
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.client import Client, WorkflowFailureError

from api.admission import Admitter, new_task_id
from api.errors import ApiError
from db.models import COMMITTED, RELEASED
from db.quota import MSG_VM_DELETED
from payloads import MSG_CLONE_FAILED, MSG_CONFIGURE_FAILED, MSG_CREATED, CreateFromBoxInput
from settings import Settings
from tests.conftest import TEMPORAL_BIN, created_vms, reservations, result_of, vm_records
from tests.factories import BOX, auth, body
from tests.waiting import until_async
from workflows.metadata import creation_summary

API = "/api/v1/vm/manage"
CREATE = f"{API}/createFromBoxTemplate"


async def create(api: httpx.AsyncClient, **overrides: Any) -> dict[str, Any]:
    response = await api.post(CREATE, json=body(**overrides), headers=auth())
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()["data"]
    return data


async def found(temporal: Client, query: str) -> list[str]:
    return [run.id async for run in temporal.list_workflows(query)]


async def until_found(temporal: Client, task_id: str, condition: str) -> None:
    """Visibility is eventually consistent: poll until the run is listed by `condition`."""
    query = f"WorkflowId = '{task_id}' AND {condition}"
    await until_async(lambda: found(temporal, query), [task_id], timeout=15)


async def current_details(temporal: Client, task_id: str) -> str:
    metadata = await temporal.get_workflow_handle(task_id).query(
        "__temporal_workflow_metadata", result_type=WorkflowMetadata
    )
    return metadata.current_details


# ------------------------------------------------------------------------------------- search attributes


@pytest.mark.usefixtures("worker")
async def test_a_creation_is_found_by_each_search_attribute(api: httpx.AsyncClient, temporal: Client) -> None:
    task = await create(api)
    await result_of(temporal, task["task_id"])
    for condition in (
        "BoxOwner = 'alice'",
        f"BoxId = '{BOX}'",
        "PveNode = 'pve2'",
        f"VmId = {task['vmid']}",
        "BoxStep = 'done'",
    ):
        await until_found(temporal, task["task_id"], condition)


async def test_a_run_no_worker_picked_up_is_found_by_owner_box_and_node(
    temporal: Client, engine: Engine, settings: Settings
) -> None:
    """Set at the start by the API: the run is listed by them although no worker ever ran it."""
    idle = Admitter(temporal, engine, f"{settings.temporal_task_queue}-idle", timeout=0.5)
    input = CreateFromBoxInput(
        username="alice", box_id=BOX, name="never-run", target="pve1", cpu_cores=1, memory_mb=1024, disk_gb=10
    )
    task_id = new_task_id(BOX)
    with pytest.raises(ApiError):
        await idle.admit(task_id, input)
    for condition in ("BoxOwner = 'alice'", f"BoxId = '{BOX}'", "PveNode = 'pve1'"):
        await until_found(temporal, task_id, condition)
    await temporal.get_workflow_handle(task_id).terminate("test over")


def test_a_summary_counts_one_core_as_one() -> None:
    one = CreateFromBoxInput(
        username="alice", box_id="ubuntu", name="web-01", target="pve2", cpu_cores=1, memory_mb=512, disk_gb=10
    )
    assert creation_summary(one) == "web-01 · alice · box ubuntu → pve2 · 1 core, 512 MB, 10 GB"


@pytest.mark.usefixtures("one_clone_per_node", "worker")
@pytest.mark.fakepve(time_scale=1)
async def test_a_vmid_replaced_after_a_collision_moves_vm_id(
    api: httpx.AsyncClient, temporal: Client, pve: Any
) -> None:
    pve.add_ceph_storage("ceph")
    pve.ceph_slow(2)
    first = await create(api, name="first", storage="ceph", cpuCores=1)
    second = await create(api, name="second", storage="ceph", cpuCores=1)
    assert second["vmid"] == "101"
    await until_found(temporal, second["task_id"], "VmId = 101")
    # The second waits for the first's clone slot, and says so; meanwhile someone makes VM 101 by hand.
    assert (
        await current_details(temporal, second["task_id"]) == "waiting for a clone slot on pve1/ceph, number 1 in line"
    )
    pve.add_vm(101, "made-by-hand", node="pve2")
    await result_of(temporal, first["task_id"])
    assert (await result_of(temporal, second["task_id"])).vmid == 102
    await until_found(temporal, second["task_id"], "VmId = 102")
    assert await found(temporal, f"WorkflowId = '{second['task_id']}' AND VmId = 101") == []


@pytest.mark.usefixtures("one_clone_per_node", "worker")
@pytest.mark.fakepve(time_scale=1)
async def test_with_wait_the_answer_names_the_vmid_the_vm_has_after_a_collision(
    api: httpx.AsyncClient, temporal: Client, pve: Any
) -> None:
    """The contract: `vmid` in the answer is the VMID the new VM has on PVE. With ?wait the answer comes after
    the run, so it names the VMID the run ended with, not the one it was admitted with."""
    pve.add_ceph_storage("ceph")
    pve.ceph_slow(2)
    await create(api, name="first", storage="ceph", cpuCores=1)
    waiting = asyncio.create_task(
        api.post(
            f"{API}/createFromBoxTemplate",
            json=body(name="second", storage="ceph", cpuCores=1),
            headers=auth(),
            params={"wait": 60},
        )
    )
    await until_async(lambda: found_any(temporal, "VmId = 101"), True)  # the second is admitted with 101
    pve.add_vm(101, "made-by-hand", node="pve2")  # while it waits for the first's clone slot
    answer = await waiting
    assert answer.status_code == 200, answer.text
    assert answer.json()["data"]["vmid"] == "102"
    assert {vm.vmid: vm.config.get("name") for vm in created_vms(pve)}[102] == "second"


async def found_any(temporal: Client, query: str) -> bool:
    return bool(await found(temporal, query))


# ------------------------------------------------------------------------------------- Web UI metadata


@pytest.mark.usefixtures("worker")
async def test_every_run_has_a_summary_details_and_true_current_details(
    api: httpx.AsyncClient, temporal: Client
) -> None:
    task = await create(api, name="web-01")
    await result_of(temporal, task["task_id"])
    creation = await temporal.get_workflow_handle(task["task_id"]).describe()
    assert await creation.static_summary() == (f"web-01 · alice · box {BOX} → pve2/NFS · 2 cores, 2048 MB, 20 GB")
    details = await creation.static_details()
    assert details is not None and "- **box**: " + BOX in details and "- **memory**: 2048 MB" in details
    assert await current_details(temporal, task["task_id"]) == "done"

    vmid = task["vmid"]
    power = await api.post(f"{API}/vms/{vmid}/power", json={"action": "reboot"}, headers=auth())
    assert power.status_code == 200, power.text
    described = await temporal.get_workflow_handle(power.json()["data"]["task_id"]).describe()
    assert await described.static_summary() == f"reboot VM {vmid} · alice"
    await until_found(temporal, power.json()["data"]["task_id"], f"VmId = {vmid} AND PveNode = 'pve2'")

    deletion = await api.delete(f"{API}/vms/{vmid}", headers=auth())
    assert deletion.status_code == 200, deletion.text
    described = await temporal.get_workflow_handle(deletion.json()["data"]["task_id"]).describe()
    assert await described.static_summary() == f"delete VM {vmid} (web-01) · alice"
    assert "- **node**: pve2" in (await described.static_details() or "")
    await until_found(temporal, deletion.json()["data"]["task_id"], f"VmId = {vmid} AND BoxOwner = 'alice'")


@pytest.mark.usefixtures("worker")
async def test_a_failed_creation_says_what_it_did_last(api: httpx.AsyncClient, temporal: Client, pve: Any) -> None:
    pve.fail("POST", "/clone", error="permission_denied")
    task = await create(api)
    with pytest.raises(WorkflowFailureError):
        await result_of(temporal, task["task_id"])
    # PVE refused the clone itself: there was no VM to destroy, and the details do not say there was.
    assert await current_details(temporal, task["task_id"]) == (
        f"done: {MSG_CLONE_FAILED}; no VM {task['vmid']} of this task's was there to destroy, quota given back"
    )

    pve.failures.clear()
    pve.fail("PUT", "/config", error="permission_denied")  # the clone is made, its configuration refused
    made = await create(api, name="web-02")
    with pytest.raises(WorkflowFailureError):
        await result_of(temporal, made["task_id"])
    assert created_vms(pve) == []
    assert await current_details(temporal, made["task_id"]) == (
        f"done: {MSG_CONFIGURE_FAILED}; VM {made['vmid']} destroyed, quota given back"
    )


# ------------------------------------------------------------------------------------- reset


def reset(temporal: Client, task_id: str, point: str = "FirstWorkflowTask") -> None:
    """What an operator runs (the Web UI's reset does the same)."""
    assert TEMPORAL_BIN
    subprocess.run(
        [
            TEMPORAL_BIN, "workflow", "reset", "--workflow-id", task_id, "--type", point, "--reason", "test",
            "--address", temporal.service_client.config.target_host, "--namespace", "default",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip


@pytest.mark.usefixtures("worker")
async def test_a_reset_of_a_creation_whose_vm_was_deleted_since_makes_no_vm_and_says_why(
    api: httpx.AsyncClient, temporal: Client, pve: Any, engine: Engine
) -> None:
    """The task's one VM record is the deleted VM's: a VM made again would count against no plan and be listed
    nowhere. The reset run is refused at admission and makes nothing; the record and the quota stay as they were."""
    task = await create(api)
    await result_of(temporal, task["task_id"])
    deletion = await api.delete(f"{API}/vms/{task['vmid']}", headers=auth())
    assert deletion.status_code == 200, deletion.text
    await result_of(temporal, deletion.json()["data"]["task_id"])
    assert created_vms(pve) == []

    reset(temporal, task["task_id"])
    with pytest.raises(WorkflowFailureError):
        await result_of(temporal, task["task_id"])
    assert created_vms(pve) == []
    [record] = vm_records(engine)
    assert record.deleted_at is not None
    assert [r.state for r in reservations(engine)] == [RELEASED]  # given back by the refused run: it counted nothing
    state = (await api.get(f"{API}/tasks/{task['task_id']}", headers=auth())).json()["data"]
    assert (state["status"], state["result_code"], state["result_message"]) == ("failed", 400, MSG_VM_DELETED)
    quota = (await api.get(f"{API}/quota", headers=auth())).json()["data"]
    assert quota["used"]["vms"] == 0, quota


@pytest.mark.usefixtures("worker")
async def test_a_reset_of_a_failed_creation_admits_it_anew_and_makes_the_vm_once(
    api: httpx.AsyncClient, temporal: Client, pve: Any, engine: Engine, settings: Settings
) -> None:
    settings.admission_timeout_seconds = 2  # the caller's deadline; the run's (admit_by) is 1.5 s after the POST
    pve.fail("POST", "/clone", error="permission_denied")
    posted = time.monotonic()
    task = await create(api)
    with pytest.raises(WorkflowFailureError):
        await result_of(temporal, task["task_id"])
    assert [r.state for r in reservations(engine)] == [RELEASED]
    # An operator resets the run once the refusal is cleared up, long after that deadline.
    await asyncio.sleep(max(0.0, posted + 2.5 - time.monotonic()))
    pve.failures.clear()

    reset(temporal, task["task_id"])
    result = await result_of(temporal, task["task_id"])
    assert [vm.vmid for vm in created_vms(pve)] == [result.vmid]
    assert [r.state for r in reservations(engine)] == [COMMITTED]
    assert [vm.vmid for vm in vm_records(engine)] == [result.vmid]
    state = (await api.get(f"{API}/tasks/{task['task_id']}", headers=auth())).json()["data"]
    assert (state["status"], state["result_message"]) == ("succeeded", MSG_CREATED)
