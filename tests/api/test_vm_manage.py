"""POST createFromBoxTemplate and GET tasks/{task_id}: every status code and message of the seed, and the
state of PVE and of the database afterwards."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine
from temporalio.client import Client

from db.models import COMMITTED, HELD
from payloads import (
    MSG_BOX_NOT_FOUND,
    MSG_CREATED,
    MSG_FORBIDDEN,
    MSG_PER_VM_LIMIT,
    MSG_PLAN_NOT_FOUND,
    MSG_TEMPLATE_NOT_FOUND,
    MSG_TOTAL_LIMIT,
)
from tests.conftest import created_vms, reservations, result_of, vm_records
from tests.factories import ALICE, BOB, CAROL, auth, body

CREATE = "/api/v1/vm/manage/createFromBoxTemplate"
INVALID_NAME_PREFIX = "Invalid VM name. Name must contain only alphanumeric characters, hyphens, and dots"

pytestmark = pytest.mark.usefixtures("worker")


async def finished(temporal: Client, task_id: str) -> None:
    """Wait until the run has ended, whatever its outcome."""
    handle = temporal.get_workflow_handle(task_id)
    for _ in range(300):
        if (await handle.describe()).close_time is not None:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{task_id} did not end")


async def task(api: httpx.AsyncClient, task_id: str, token: str = ALICE) -> dict[str, Any]:
    response = await api.get(f"/api/v1/vm/manage/tasks/{task_id}", headers=auth(token))
    assert response.status_code == 200, response.text
    return response.json()["data"]  # type: ignore[no-any-return]


def assert_nothing_left(pve: Any, engine: Engine) -> None:
    assert created_vms(pve) == []
    assert reservations(engine, HELD) == []
    assert vm_records(engine) == []


# ------------------------------------------------------------------------------ success


async def test_create_answers_at_admission_and_the_run_configures_the_vm(
    api: httpx.AsyncClient, temporal: Client, pve: Any, engine: Engine
) -> None:
    response = await api.post(CREATE, json=body(cpuCores=3, memorySize=3072, diskSize=25), headers=auth())

    assert response.status_code == 200
    answer = response.json()
    assert answer["code"] == 200
    assert answer["message"] == MSG_CREATED
    data = answer["data"]
    assert data["vm_name"] == "my-new-vm-from-box"
    assert data["vmid"] == "100"
    assert data["task_id"].startswith("clone-60d5ec49f1b2c8a1e4d3b2a1-")

    result = await result_of(temporal, data["task_id"])
    assert (result.vmid, result.vm_name, result.node) == (100, "my-new-vm-from-box", "pve2")

    [vm] = created_vms(pve)
    assert (vm.vmid, vm.node, vm.name) == (100, "pve2", "my-new-vm-from-box")
    assert vm.config["cores"] == "3"
    assert vm.config["memory"] == "3072"
    assert "pve-boxes" in vm.config["tags"]
    assert data["task_id"] in vm.config["description"]
    assert vm.lock is None
    resizes = [r for r in pve.requests if r[0] == "PUT" and r[1].endswith("/nodes/pve2/qemu/100/resize")]
    assert len(resizes) == 1 and "size=25G" in resizes[0][2].decode()

    [record] = vm_records(engine)
    assert (record.username, record.vmid, record.node, record.cores, record.memory_mb, record.disk_gb) == (
        "alice",
        100,
        "pve2",
        3,
        3072,
        25,
    )
    [reservation] = reservations(engine)
    assert reservation.state == COMMITTED

    state = await task(api, data["task_id"])
    assert state["status"] == "succeeded"
    assert state["step"] == "done"
    assert (state["vmid"], state["vm_name"], state["node"]) == ("100", "my-new-vm-from-box", "pve2")
    assert (state["result_code"], state["result_message"]) == (200, MSG_CREATED)
    assert state["started_at"].endswith("Z") and state["finished_at"].endswith("Z")


async def test_storage_defaults_to_nfs_and_can_be_named(api: httpx.AsyncClient, temporal: Client, pve: Any) -> None:
    pve.storages["fast"] = dict(pve.storages["NFS"])
    first = (await api.post(CREATE, json=body(name="a"), headers=auth())).json()["data"]
    second = (await api.post(CREATE, json=body(name="b", storage="fast"), headers=auth())).json()["data"]
    await result_of(temporal, first["task_id"])
    await result_of(temporal, second["task_id"])
    disks = {vm.name: vm.config["scsi0"] for vm in created_vms(pve)}
    assert disks["a"].startswith("NFS:")
    assert disks["b"].startswith("fast:")


async def test_same_node_clone_and_equal_disk_skip_target_and_resize(
    api: httpx.AsyncClient, temporal: Client, pve: Any
) -> None:
    data = (await api.post(CREATE, json=body(target="pve1", diskSize=10), headers=auth())).json()["data"]
    await result_of(temporal, data["task_id"])
    [vm] = created_vms(pve)
    assert vm.node == "pve1"
    assert not [r for r in pve.requests if r[1].endswith("/resize")]


async def test_wait_answers_what_the_run_ended_with(api: httpx.AsyncClient, pve: Any) -> None:
    response = await api.post(CREATE + "?wait=30", json=body(), headers=auth())
    assert response.status_code == 200
    assert response.json()["message"] == MSG_CREATED
    # The VM is there and configured by the time the answer comes.
    [vm] = created_vms(pve)
    assert vm.config["cores"] == "2"


async def test_vmids_follow_each_other_and_never_collide(
    api: httpx.AsyncClient, temporal: Client, pve: Any, engine: Engine
) -> None:
    pve.add_vm(100, "made-outside-the-service", node="pve1")
    answers = await asyncio.gather(
        *(
            api.post(CREATE, json=body(name=f"vm{i}", cpuCores=1, memorySize=512, diskSize=10), headers=auth())
            for i in range(4)
        )
    )
    vmids = sorted(int(a.json()["data"]["vmid"]) for a in answers)
    assert vmids == [101, 102, 103, 104]
    for answer in answers:
        await temporal.get_workflow_handle(answer.json()["data"]["task_id"]).result()
    assert sorted(vm.vmid for vm in created_vms(pve)) == [100, 101, 102, 103, 104]
    assert len(vm_records(engine)) == 4


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("overrides", "token", "status", "message"),
    [
        ({"box_id": "no-such-box"}, ALICE, 404, MSG_BOX_NOT_FOUND),
        ({"box_id": "box-orphan"}, ALICE, 404, MSG_TEMPLATE_NOT_FOUND),
        ({}, BOB, 403, MSG_FORBIDDEN),
        ({"box_id": "box-gone"}, ALICE, 404, MSG_TEMPLATE_NOT_FOUND),
        ({}, CAROL, 404, MSG_PLAN_NOT_FOUND),
        ({"cpuCores": 5}, ALICE, 400, MSG_PER_VM_LIMIT),
        ({"memorySize": 8193}, ALICE, 400, MSG_PER_VM_LIMIT),
        ({"diskSize": 101}, ALICE, 400, MSG_PER_VM_LIMIT),
        ({"target": "pve9"}, ALICE, 400, "Unknown target node 'pve9'"),
        ({"storage": "nope"}, ALICE, 400, "Storage 'nope' is not available on node 'pve2'"),
        ({"storage": "local"}, ALICE, 400, "Storage 'local' cannot hold VM disks"),
        ({"storage": "local-lvm"}, ALICE, 400, "Storage 'local-lvm' is not shared"),
        ({"diskSize": 9}, ALICE, 400, "diskSize 9 GB is smaller than the template's disk (10 GB)"),
    ],
)
async def test_refusals_answer_the_seed_and_leave_nothing(
    api: httpx.AsyncClient,
    pve: Any,
    engine: Engine,
    overrides: dict[str, Any],
    token: str,
    status: int,
    message: str,
) -> None:
    response = await api.post(CREATE, json=body(**overrides), headers=auth(token))
    assert response.status_code == status
    answer = response.json()
    assert answer["code"] == status
    assert answer["message"].startswith(message)
    assert answer["data"] is None
    assert_nothing_left(pve, engine)
    assert not [r for r in pve.requests if r[0] != "GET" and "/access/ticket" not in r[1]]


async def test_offline_target_node_is_a_503_naming_it(api: httpx.AsyncClient, pve: Any, engine: Engine) -> None:
    # A node that is down may come back: the server's trouble, not the client's mistake (contract, version 2).
    pve.set_node_offline("pve2")
    response = await api.post(CREATE, json=body(), headers=auth())
    assert (response.status_code, response.json()["message"]) == (
        503,
        "Service unavailable: target node 'pve2' is offline",
    )
    assert_nothing_left(pve, engine)


async def test_checks_run_in_the_contract_order(api: httpx.AsyncClient, pve: Any) -> None:
    # Box before everything; permission before PVE; PVE checks before the plan; per-VM before totals.
    everything_wrong = {"target": "pve9", "cpuCores": 99}
    assert (await api.post(CREATE, json=body(box_id="x", **everything_wrong), headers=auth(BOB))).json()[
        "message"
    ] == MSG_BOX_NOT_FOUND
    assert (await api.post(CREATE, json=body(**everything_wrong), headers=auth(BOB))).json()["message"] == MSG_FORBIDDEN
    assert (await api.post(CREATE, json=body(**everything_wrong), headers=auth(CAROL))).json()[
        "message"
    ] == "Unknown target node 'pve9'"
    assert (await api.post(CREATE, json=body(cpuCores=99), headers=auth(CAROL))).json()["message"] == MSG_PLAN_NOT_FOUND


async def test_total_limits_count_vms_and_creations_in_flight(
    api: httpx.AsyncClient, temporal: Client, pve: Any, engine: Engine
) -> None:
    # Plan "small": 8 cores in total. Two VMs of 4 cores fill it; a third is refused, even while in flight.
    first = await api.post(CREATE, json=body(name="one", cpuCores=4), headers=auth())
    second = await api.post(CREATE, json=body(name="two", cpuCores=4), headers=auth())
    assert (first.status_code, second.status_code) == (200, 200)
    third = await api.post(CREATE, json=body(name="three", cpuCores=1), headers=auth())
    assert (third.status_code, third.json()["message"]) == (400, MSG_TOTAL_LIMIT)
    for answer in (first, second):
        await temporal.get_workflow_handle(answer.json()["data"]["task_id"]).result()
    again = await api.post(CREATE, json=body(name="three", cpuCores=1), headers=auth())
    assert (again.status_code, again.json()["message"]) == (400, MSG_TOTAL_LIMIT)
    assert len(created_vms(pve)) == 2
    # Another user's plan is their own.
    other = await api.post(CREATE, json=body(name="carols", cpuCores=1), headers=auth(CAROL))
    assert other.status_code == 404  # carol has no plan: still her own answer, not alice's totals


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("web-01", True),
        ("web.example.com", True),
        ("a", True),
        ("under_score", False),
        ("-leading", False),
        ("trailing-", False),
        ("two..dots", False),
        ("space name", False),
        ("ümlaut", False),
        ("", False),
        ("x" * 129, False),
    ],
)
async def test_vm_name_follows_pves_dns_name_rule(
    api: httpx.AsyncClient, pve: Any, engine: Engine, name: str, valid: bool
) -> None:
    response = await api.post(CREATE, json=body(name=name), headers=auth())
    if valid:
        assert response.status_code == 200, response.text
    else:
        assert response.status_code == 400
        assert response.json()["message"].startswith(INVALID_NAME_PREFIX)
        assert_nothing_left(pve, engine)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"box_id": ...}, "box_id"),
        ({"name": ...}, "name"),
        ({"target": ...}, "target"),
        ({"cpuCores": ...}, "cpuCores"),
        ({"memorySize": ...}, "memorySize"),
        ({"diskSize": ...}, "diskSize"),
        ({"cpuCores": 0}, "cpuCores"),
        ({"cpuCores": -2}, "cpuCores"),
        ({"cpuCores": 1.5}, "cpuCores"),
        ({"cpuCores": "2"}, "cpuCores"),
        ({"cpuCores": True}, "cpuCores"),
        ({"memorySize": None}, "memorySize"),
        ({"diskSize": [20]}, "diskSize"),
        ({"box_id": 5}, "box_id"),
        ({"storage": 3}, "storage"),
        ({"target": ""}, "target"),
    ],
)
async def test_invalid_body_is_a_400_naming_the_field(
    api: httpx.AsyncClient, pve: Any, engine: Engine, overrides: dict[str, Any], field: str
) -> None:
    response = await api.post(CREATE, json=body(**overrides), headers=auth())
    assert response.status_code == 400
    answer = response.json()
    assert answer["code"] == 400 and answer["data"] is None
    assert f"'{field}'" in answer["message"]
    assert_nothing_left(pve, engine)


async def test_body_that_is_not_json_is_a_400(api: httpx.AsyncClient) -> None:
    response = await api.post(CREATE, content=b"{not json", headers={**auth(), "Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["code"] == 400


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer"}, {"Authorization": f"Basic {ALICE}"}, auth("x" * 40), auth("short")],
)
async def test_requests_without_a_valid_token_get_401(api: httpx.AsyncClient, headers: dict[str, str]) -> None:
    for response in (
        await api.post(CREATE, json=body(), headers=headers),
        await api.get("/api/v1/vm/manage/tasks/anything", headers=headers),
        # Whatever the body or the query says: the token is the first thing a request is answered on.
        await api.post(CREATE, content=b"{not json", headers={**headers, "Content-Type": "application/json"}),
        await api.post(CREATE, json=body(cpuCores="two"), headers=headers),
        await api.get("/api/v1/vm/manage/tasks", params={"limit": "abc"}, headers=headers),
    ):
        assert response.status_code == 401
        assert response.json() == {"code": 401, "message": "Missing or invalid Bearer token", "data": None}
        assert response.headers["www-authenticate"] == "Bearer"


async def test_unknown_route_answers_in_the_envelope(api: httpx.AsyncClient) -> None:
    response = await api.get("/api/v1/nothing", headers=auth())
    assert response.status_code == 404
    assert set(response.json()) == {"code", "message", "data"}


# ------------------------------------------------------------------------------- tasks


async def test_a_task_is_visible_only_to_its_owner(api: httpx.AsyncClient, temporal: Client) -> None:
    task_id = (await api.post(CREATE, json=body(), headers=auth())).json()["data"]["task_id"]
    await result_of(temporal, task_id)
    for token, path in ((BOB, task_id), (ALICE, "clone-unknown"), (ALICE, "x" * 2000)):
        response = await api.get(f"/api/v1/vm/manage/tasks/{path}", headers=auth(token))
        assert response.status_code == 404
        assert response.json() == {"code": 404, "message": "Task not found", "data": None}
