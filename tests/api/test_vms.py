"""GET vms, DELETE vms/{vmid}, GET quota and GET boxes, end to end: the real API, worker and Temporal dev server
against fakepve. Everything is strictly the caller's: another user's VM is a 404 and never listed."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine
from temporalio.client import Client, WorkflowFailureError
from temporalio.exceptions import ApplicationError

from db.models import HELD
from db.quota import Size, reserve
from payloads import (
    MSG_CREATED,
    MSG_DELETE_FAILED,
    MSG_DELETED,
    MSG_DELETION_STARTED,
    MSG_PLAN_NOT_FOUND,
    MSG_TOTAL_LIMIT,
    MSG_VM_BEING_CREATED,
    MSG_VM_NOT_FOUND,
)
from tests.conftest import created_vms, reservations, result_of, vm_records
from tests.factories import ALICE, BOB, BOX, CAROL, auth, body
from workflows import DeleteVmResult

API = "/api/v1/vm/manage"
CREATE = f"{API}/createFromBoxTemplate"

pytestmark = pytest.mark.usefixtures("worker")


async def create(api: httpx.AsyncClient, temporal: Client, token: str = ALICE, **overrides: Any) -> dict[str, Any]:
    """Create a VM and wait until it is made; the POST's data."""
    response = await api.post(CREATE, json=body(**overrides), headers=auth(token))
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()["data"]
    await result_of(temporal, data["task_id"])
    return data


async def delete(api: httpx.AsyncClient, vmid: str, token: str = ALICE) -> httpx.Response:
    return await api.delete(f"{API}/vms/{vmid}", headers=auth(token))


async def deleted(temporal: Client, task_id: str) -> DeleteVmResult:
    handle = temporal.get_workflow_handle(task_id, result_type=DeleteVmResult)
    result: DeleteVmResult = await handle.result()
    return result


async def vms_of(api: httpx.AsyncClient, token: str = ALICE, **params: Any) -> dict[str, Any]:
    response = await api.get(f"{API}/vms", params=params, headers=auth(token))
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()["data"]
    return data


async def quota(api: httpx.AsyncClient, token: str = ALICE) -> dict[str, Any]:
    response = await api.get(f"{API}/quota", headers=auth(token))
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()["data"]
    return data


# ---------------------------------------------------------------------------------- GET vms


async def test_the_owner_sees_the_vm_with_its_record_and_another_user_sees_nothing(
    api: httpx.AsyncClient, temporal: Client
) -> None:
    made = await create(api, temporal, cpuCores=3, memorySize=3072, diskSize=25)

    [vm] = (await vms_of(api))["vms"]
    created_at = vm.pop("created_at")
    assert created_at.endswith("Z") and len(created_at) == len("2026-11-27T10:00:00Z")
    assert vm == {
        "vmid": "100",
        "vm_name": "my-new-vm-from-box",
        "node": "pve2",
        "box_id": BOX,
        "cpuCores": 3,
        "memorySize": 3072,
        "diskSize": 25,
        "storage": "NFS",
        "task_id": made["task_id"],
        "ip_addresses": [],
        "deleting": False,
    }
    assert await vms_of(api, BOB) == {"vms": [], "next": None}


async def test_vms_are_listed_newest_first_a_page_at_a_time(api: httpx.AsyncClient, temporal: Client) -> None:
    names = ["vm-a", "vm-b", "vm-c"]
    for name in names:
        await create(api, temporal, name=name, cpuCores=1, memorySize=1024, diskSize=10)

    first = await vms_of(api, limit=2)
    assert [vm["vm_name"] for vm in first["vms"]] == ["vm-c", "vm-b"]
    assert first["next"] is not None
    second = await vms_of(api, limit=2, next=first["next"])
    assert [vm["vm_name"] for vm in second["vms"]] == ["vm-a"]
    assert second["next"] is None
    assert [vm["vm_name"] for vm in (await vms_of(api))["vms"]] == ["vm-c", "vm-b", "vm-a"]


@pytest.mark.parametrize("query", ["limit=0", "limit=201", "limit=x", "next=not-a-cursor", "next=W10="])
async def test_a_bad_page_request_is_a_400(api: httpx.AsyncClient, query: str) -> None:
    response = await api.get(f"{API}/vms?{query}", headers=auth())
    assert response.status_code == 400, response.text
    assert response.json()["code"] == 400
    assert response.json()["message"].startswith("Invalid query parameter: ")


def cursor(created_at: str, task_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([created_at, task_id]).encode()).decode()


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
@pytest.mark.parametrize(
    ("crafted", "status"),
    [
        (cursor("9999-12-31T23:59:59", "x"), 200),  # no timezone: taken as UTC, as the database keeps it
        (cursor("0001-01-01T00:00:00+14:00", "x"), 400),  # before year 1 once in UTC
        (cursor("2026-01-01T00:00:00+00:00", "clone-\u0000"), 400),  # PostgreSQL cannot even compare a NUL
    ],
)
async def test_a_crafted_cursor_is_answered_never_a_server_error(
    api: httpx.AsyncClient, crafted: str, status: int
) -> None:
    # Found by the fuzz run (tests/test_fuzz.py): each of these was a 500.
    response = await api.get(f"{API}/vms", params={"next": crafted}, headers=auth())
    assert (response.status_code, response.json()["code"]) == (status, status), response.text


@pytest.mark.parametrize(
    ("method", "path"), [("GET", "/vms"), ("DELETE", "/vms/100"), ("GET", "/quota"), ("GET", "/boxes")]
)
async def test_every_new_endpoint_needs_a_token(api: httpx.AsyncClient, method: str, path: str) -> None:
    response = await api.request(method, f"{API}{path}")
    assert response.status_code == 401
    assert response.json()["data"] is None


# ------------------------------------------------------------------------------- DELETE vms


async def test_another_users_unknown_and_deleted_vms_are_404(
    api: httpx.AsyncClient, temporal: Client, pve: Any, engine: Engine
) -> None:
    await create(api, temporal)

    for vmid, token in (("100", BOB), ("101", ALICE), ("abc", ALICE), ("0", ALICE), ("99999999999", ALICE)):
        response = await delete(api, vmid, token)
        assert (response.status_code, response.json()) == (
            404,
            {"code": 404, "message": MSG_VM_NOT_FOUND, "data": None},
        )
    assert len(created_vms(pve)) == 1
    assert [vm.deleted_at for vm in vm_records(engine)] == [None]

    answer = (await delete(api, "100")).json()
    await deleted(temporal, answer["data"]["task_id"])
    response = await delete(api, "100")
    assert (response.status_code, response.json()["message"]) == (404, MSG_VM_NOT_FOUND)


async def test_a_user_at_the_plans_total_deletes_a_vm_and_can_create_again(
    api: httpx.AsyncClient, temporal: Client, pve: Any, engine: Engine
) -> None:
    full: dict[str, Any] = {"cpuCores": 4, "memorySize": 8192, "diskSize": 100}  # two: alice's whole plan
    first = await create(api, temporal, name="big-1", **full)
    await create(api, temporal, name="big-2", **full)
    refused = await api.post(CREATE, json=body(name="big-3", **full), headers=auth())
    assert (refused.status_code, refused.json()["message"]) == (400, MSG_TOTAL_LIMIT)

    response = await delete(api, first["vmid"])

    assert response.status_code == 200
    answer = response.json()
    assert answer["message"] == MSG_DELETION_STARTED
    assert answer["data"] == {"task_id": f"delete-{first['task_id']}", "vmid": first["vmid"]}
    result = await deleted(temporal, answer["data"]["task_id"])
    assert (result.vmid, result.vm_name, result.node) == (100, "big-1", "pve2")
    assert [vm.vmid for vm in created_vms(pve)] == [101]
    memo = await temporal.get_workflow_handle(answer["data"]["task_id"]).describe()
    state = (await memo.memo())["state"]
    assert (state["kind"], state["step"], state["result_code"]) == ("delete", "done", 200)
    assert state["result_message"] == MSG_DELETED

    again = await api.post(CREATE, json=body(name="big-3", **full), headers=auth())
    assert (again.status_code, again.json()["message"]) == (200, MSG_CREATED)
    await result_of(temporal, again.json()["data"]["task_id"])
    assert [vm["vm_name"] for vm in (await vms_of(api))["vms"]] == ["big-3", "big-2"]


async def test_a_running_vm_is_stopped_and_destroyed_with_its_disks(
    api: httpx.AsyncClient, temporal: Client, pve: Any
) -> None:
    made = await create(api, temporal)
    vm = pve.vm(100)
    vm.status = vm.qmpstatus = "running"
    disks = {name for name, volume in pve.storages["NFS"].get("volumes", {}).items() if volume.get("vmid") == 100}
    assert disks

    answer = (await delete(api, made["vmid"])).json()
    await deleted(temporal, answer["data"]["task_id"])

    assert created_vms(pve) == []
    assert not any(volume.get("vmid") == 100 for volume in pve.storages["NFS"].get("volumes", {}).values())


async def test_a_vm_gone_from_pve_still_deletes_and_frees_its_quota(
    api: httpx.AsyncClient, temporal: Client, pve: Any, engine: Engine
) -> None:
    made = await create(api, temporal)
    pve.vms.remove(pve.vm(100))  # deleted by hand on PVE
    assert (await quota(api))["used"]["vms"] == 1

    answer = (await delete(api, made["vmid"])).json()
    await deleted(temporal, answer["data"]["task_id"])

    assert (await quota(api))["used"] == {"cores": 0, "memory_mb": 0, "disk_gb": 0, "vms": 0}
    assert (await vms_of(api))["vms"] == []
    assert [vm.deleted_at is not None for vm in vm_records(engine)] == [True]
    # The deletion is a task of its owner's, followed like a creation; nobody else's.
    task = (await api.get(f"{API}/tasks/{answer['data']['task_id']}", headers=auth())).json()
    assert {k: task["data"][k] for k in ("kind", "status", "step", "vmid", "result_code", "result_message")} == {
        "kind": "delete",
        "status": "succeeded",
        "step": "done",
        "vmid": made["vmid"],
        "result_code": 200,
        "result_message": MSG_DELETED,
    }
    other = await api.get(f"{API}/tasks/{answer['data']['task_id']}", headers=auth(BOB))
    assert (other.status_code, other.json()["message"]) == (404, "Task not found")
    creation = (await api.get(f"{API}/tasks/{made['task_id']}", headers=auth())).json()["data"]
    assert creation["kind"] == "create"


@pytest.mark.fakepve(time_scale=1)
async def test_a_repeat_while_the_deletion_runs_answers_the_same_task(
    api: httpx.AsyncClient, temporal: Client, pve: Any
) -> None:
    made = await create(api, temporal)
    vm = pve.vm(100)
    vm.status = vm.qmpstatus = "running"
    vm.stop_secs = 2  # the deletion waits on the stop meanwhile

    first = (await delete(api, made["vmid"])).json()["data"]
    [listed] = (await vms_of(api))["vms"]
    second = (await delete(api, made["vmid"])).json()["data"]

    assert listed["deleting"] is True
    assert second == first
    description = await temporal.get_workflow_handle(first["task_id"]).describe()
    assert description.close_time is None, "the repeat came while the deletion ran"
    await deleted(temporal, first["task_id"])
    runs = [run async for run in temporal.list_workflows(f"WorkflowId = '{first['task_id']}'")]
    assert len(runs) == 1
    assert (await vms_of(api))["vms"] == []


async def test_a_vm_whose_creation_still_runs_cannot_be_deleted(
    api: httpx.AsyncClient, pve: Any, engine: Engine
) -> None:
    # A creation admitted and under way: it holds the VMID, and its record is written when it ends.
    reserve(engine, "clone-under-way", "alice", Size(1, 1024, 10), [[105, 105]])

    response = await delete(api, "105")
    assert (response.status_code, response.json()["message"]) == (409, MSG_VM_BEING_CREATED)
    response = await delete(api, "105", BOB)
    assert (response.status_code, response.json()["message"]) == (404, MSG_VM_NOT_FOUND)
    assert [r.task_id for r in reservations(engine, HELD)] == ["clone-under-way"]


async def test_a_failed_deletion_frees_nothing_and_may_be_asked_again(
    api: httpx.AsyncClient, temporal: Client, pve: Any
) -> None:
    made = await create(api, temporal)
    pve.fail("DELETE", "/nodes/pve2/qemu/100", 403, "Permission check failed (/vms/100, VM.Allocate)")

    task_id = (await delete(api, made["vmid"])).json()["data"]["task_id"]
    with pytest.raises(WorkflowFailureError) as failure:
        await deleted(temporal, task_id)
    assert isinstance(failure.value.cause, ApplicationError)
    assert failure.value.cause.message == MSG_DELETE_FAILED
    state = (await (await temporal.get_workflow_handle(task_id).describe()).memo())["state"]
    assert (state["result_code"], state["result_message"]) == (500, MSG_DELETE_FAILED)
    assert [vm["deleting"] for vm in (await vms_of(api))["vms"]] == [False]
    assert (await quota(api))["used"]["vms"] == 1

    pve.failures.clear()
    again = (await delete(api, made["vmid"])).json()["data"]["task_id"]
    assert again == task_id
    await deleted(temporal, again)
    assert created_vms(pve) == []
    assert (await quota(api))["used"]["vms"] == 0


# --------------------------------------------------------------------------------- GET quota


async def test_quota_counts_what_admission_counts(api: httpx.AsyncClient, temporal: Client, engine: Engine) -> None:
    plan = {
        "plan": "small",
        "per_vm": {"cores": 4, "memory_mb": 8192, "disk_gb": 100},
        "total": {"cores": 8, "memory_mb": 16384, "disk_gb": 200, "vms": 5},
    }
    assert await quota(api) == {
        **plan,
        "used": {"cores": 0, "memory_mb": 0, "disk_gb": 0, "vms": 0},
        "available": plan["total"],
    }

    await create(api, temporal)  # 2 cores, 2048 MB, 20 GB
    reserve(engine, "clone-in-flight", "alice", Size(1, 1024, 10), [[200, 300]])  # a creation in flight counts

    assert await quota(api) == {
        **plan,
        "used": {"cores": 3, "memory_mb": 3072, "disk_gb": 30, "vms": 2},
        "available": {"cores": 5, "memory_mb": 13312, "disk_gb": 170, "vms": 3},
    }
    assert (await quota(api, BOB))["used"]["vms"] == 0


async def test_a_user_without_a_plan_has_no_quota(api: httpx.AsyncClient) -> None:
    response = await api.get(f"{API}/quota", headers=auth(CAROL))
    assert (response.status_code, response.json()) == (
        404,
        {"code": 404, "message": MSG_PLAN_NOT_FOUND, "data": None},
    )


# --------------------------------------------------------------------------------- GET boxes


async def test_boxes_lists_only_the_boxes_the_caller_may_use(api: httpx.AsyncClient) -> None:
    async def box_ids(token: str) -> list[str]:
        response = await api.get(f"{API}/boxes", headers=auth(token))
        assert response.status_code == 200
        return [box["id"] for box in response.json()["data"]["boxes"]]

    # BOX's template allows alice and carol; box-gone's template is public; box-orphan's is not defined.
    assert await box_ids(ALICE) == [BOX, "box-gone"]
    assert await box_ids(BOB) == ["box-gone"]
    response = await api.get(f"{API}/boxes", headers=auth())
    assert response.json()["data"]["boxes"][0] == {
        "id": BOX,
        "name": "Ubuntu box",
        "template": "Ubuntu 24.04",
        "start": False,
        "cloud_init": False,
        "pool": None,
        "tags": [],
        "network": None,
    }
