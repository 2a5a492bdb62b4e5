"""GET tasks, GET tasks/{task_id} and POST tasks/{task_id}/cancel, end to end: the real API, worker and Temporal
dev server against fakepve. The dev server is shared by the whole session and its visibility is eventually
consistent: each test lists tasks of users of its own, and polls until visibility has caught up."""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import subprocess
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError

from api.admission import Admitter
from api.errors import ApiError
from api.routes.tasks import (
    MSG_ALREADY_ENDED,
    MSG_CANCELLATION_REQUESTED,
    MSG_NOT_CANCELLABLE,
    decode_cursor,
    encode_cursor,
)
from api.routes.vms import BAD_CURSOR
from api.task_state import tasks_query
from db.load import load_admin_data
from db.vms import deletable
from payloads import MSG_CONFIGURE_FAILED, MSG_DELETION_STARTED, MSG_PER_VM_LIMIT, MSG_UNAVAILABLE, CreateFromBoxInput
from settings import Settings
from tests.conftest import TEMPORAL_BIN, created_vms, result_of
from tests.factories import BOX, auth, body
from tests.waiting import until
from workflows.delete_vm import start_deletion

API = "/api/v1/vm/manage"
CREATE = f"{API}/createFromBoxTemplate"
TASKS = f"{API}/tasks"

pytestmark = pytest.mark.usefixtures("worker")


class User:
    def __init__(self, name: str):
        self.name = name
        self.token = f"{secrets.token_hex(16)}-session-token"
        self.headers = auth(self.token)


@pytest.fixture
def users(engine: Engine) -> list[User]:
    """Three users of this test only, on the small plan and allowed the box's template: the dev server's
    visibility holds the runs of every test of the session, and alice's of other tests would be listed."""
    made = [User(f"user-{secrets.token_hex(4)}") for _ in range(3)]
    names = [user.name for user in made]
    load_admin_data(
        engine,
        {
            "users": [{"username": u.name, "plan": "small", "tokens": [u.token]} for u in made],
            "templates": [
                {
                    "id": "tpl-ubuntu",
                    "name": "Ubuntu 24.04",
                    "node": "pve1",
                    "vmid": 9000,
                    "public": False,
                    "allowed_users": ["alice", "carol", *names],
                }
            ],
        },
    )
    return made


async def create(api: httpx.AsyncClient, user: User, **overrides: Any) -> str:
    response = await api.post(CREATE, json=body(**overrides), headers=user.headers)
    assert response.status_code == 200, response.text
    task_id: str = response.json()["data"]["task_id"]
    return task_id


async def task_state(api: httpx.AsyncClient, user: User, task_id: str) -> dict[str, Any]:
    response = await api.get(f"{TASKS}/{task_id}", headers=user.headers)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()["data"]
    return data


async def cancel(api: httpx.AsyncClient, user: User, task_id: str) -> httpx.Response:
    return await api.post(f"{TASKS}/{task_id}/cancel", headers=user.headers)


async def listing(api: httpx.AsyncClient, user: User, **params: Any) -> dict[str, Any]:
    response = await api.get(TASKS, params=params, headers=user.headers)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()["data"]
    return data


async def listed_when(
    api: httpx.AsyncClient, user: User, ready: Callable[[list[dict[str, Any]]], bool], **params: Any
) -> list[dict[str, Any]]:
    """The user's listing once `ready` holds for it (visibility catches up within a second or so)."""
    tasks: list[dict[str, Any]] = []
    for _ in range(100):
        tasks = (await listing(api, user, **params))["tasks"]
        if ready(tasks):
            return tasks
        await asyncio.sleep(0.1)
    raise AssertionError(f"the listing never got ready: {tasks}")


def ended(count: int) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda tasks: len(tasks) == count and all(task["status"] != "running" for task in tasks)


def summary(tasks: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(task["task_id"], task["kind"], task["status"]) for task in tasks]


def assert_error(response: httpx.Response, code: int, message: str) -> None:
    assert (response.status_code, response.json()) == (code, {"code": code, "message": message, "data": None})


# ------------------------------------------------------------------------------------ cancel


@pytest.mark.fakepve(time_scale=1)
async def test_cancelling_a_creation_in_its_clone_cleans_up_ends_cancelled_and_gives_the_quota_back(
    api: httpx.AsyncClient, temporal: Client, pve: Any, users: list[User]
) -> None:
    owner, stranger, _ = users
    pve.add_ceph_storage("ceph")
    pve.ceph_slow(3)  # the clone onto ceph takes 3 s
    task_id = await create(api, owner, storage="ceph")
    await until(lambda: any(vm.lock == "clone" for vm in created_vms(pve)))

    assert_error(await cancel(api, stranger, task_id), 404, "Task not found")
    response = await cancel(api, owner, task_id)

    assert response.status_code == 200, response.text
    answer = response.json()
    assert (answer["code"], answer["message"]) == (200, MSG_CANCELLATION_REQUESTED)
    assert (answer["data"]["task_id"], answer["data"]["kind"], answer["data"]["step"]) == (task_id, "create", "clone")
    with pytest.raises(WorkflowFailureError):
        await result_of(temporal, task_id)
    assert created_vms(pve) == []
    seen = await task_state(api, owner, task_id)
    assert seen["status"] == "cancelled"
    quota = (await api.get(f"{API}/quota", headers=owner.headers)).json()["data"]
    assert quota["used"] == {"cores": 0, "memory_mb": 0, "disk_gb": 0, "vms": 0}
    assert_error(await cancel(api, owner, task_id), 409, MSG_ALREADY_ENDED)
    [listed] = await listed_when(api, owner, ended(1), status="cancelled")
    assert listed == seen


async def test_a_waiting_request_whose_run_is_cancelled_in_its_configuration_answers_that_message(
    api: httpx.AsyncClient, pve: Any, users: list[User]
) -> None:
    owner = users[0]
    pve.fail("PUT", "/config", 500, "got timeout")  # the configuration is retried, again and again
    waiting = asyncio.ensure_future(api.post(CREATE, params={"wait": 60}, json=body(), headers=owner.headers))
    await until(lambda: any(r[0] == "PUT" and r[1].endswith("/config") for r in pve.requests))
    [task] = await listed_when(api, owner, lambda tasks: len(tasks) == 1)
    assert (await cancel(api, owner, task["task_id"])).status_code == 200

    # What the run ended with, as the task's state says it, not the clone's message.
    assert_error(await waiting, 500, MSG_CONFIGURE_FAILED)
    assert created_vms(pve) == []


async def test_a_deletion_cannot_be_cancelled_and_goes_on_to_its_end(
    api: httpx.AsyncClient, temporal: Client, pve: Any, users: list[User]
) -> None:
    owner = users[0]
    vmid = (await result_of(temporal, await create(api, owner))).vmid
    deletion = await api.delete(f"{API}/vms/{vmid}", headers=owner.headers)
    assert deletion.json()["message"] == MSG_DELETION_STARTED
    task_id = deletion.json()["data"]["task_id"]

    assert_error(await cancel(api, owner, task_id), 409, MSG_NOT_CANCELLABLE)

    await temporal.get_workflow_handle(task_id).result()
    assert created_vms(pve) == []
    assert_error(await cancel(api, owner, task_id), 409, MSG_NOT_CANCELLABLE)


async def test_a_power_action_cannot_be_cancelled(api: httpx.AsyncClient, temporal: Client, users: list[User]) -> None:
    owner = users[0]
    vmid = (await result_of(temporal, await create(api, owner))).vmid
    power = await api.post(f"{API}/vms/{vmid}/power", json={"action": "start"}, headers=owner.headers)
    assert power.status_code == 200, power.text

    assert_error(await cancel(api, owner, power.json()["data"]["task_id"]), 409, MSG_NOT_CANCELLABLE)


async def test_cancelling_an_unknown_task_is_a_404(api: httpx.AsyncClient, users: list[User]) -> None:
    assert_error(await cancel(api, users[0], "clone-nothing-1-abc"), 404, "Task not found")


# ------------------------------------------------------------------------------------ GET tasks


async def test_the_listing_holds_the_callers_tasks_in_visibility_order_and_filters_by_status(
    api: httpx.AsyncClient, temporal: Client, users: list[User]
) -> None:
    owner, other, _ = users
    first = await create(api, owner, name="first")
    vmid = (await result_of(temporal, first)).vmid
    refused = await api.post(CREATE, json=body(cpuCores=5), headers=owner.headers)
    assert refused.json()["message"] == MSG_PER_VM_LIMIT
    [refusal] = await listed_when(api, owner, ended(1), status="failed")  # refused creations are tasks too
    deletion = (await api.delete(f"{API}/vms/{vmid}", headers=owner.headers)).json()["data"]["task_id"]
    await temporal.get_workflow_handle(deletion).result()
    second = await create(api, owner, name="second")
    await result_of(temporal, second)
    others = await create(api, other, name="not-yours")

    tasks = await listed_when(api, owner, ended(4))

    # Ended ones, the most recently ended first.
    assert summary(tasks) == [
        (second, "create", "succeeded"),
        (deletion, "delete", "succeeded"),
        (refusal["task_id"], "create", "failed"),
        (first, "create", "succeeded"),
    ]
    assert (refusal["result_code"], refusal["result_message"], refusal["vmid"]) == (400, MSG_PER_VM_LIMIT, None)
    assert tasks[0] == await task_state(api, owner, second)  # the same state as GET tasks/{task_id}
    assert [t["task_id"] for t in await listed_when(api, owner, ended(3), status="succeeded")] == [
        second,
        deletion,
        first,
    ]
    assert (await listing(api, owner, status="running"))["tasks"] == []
    assert (await listing(api, owner, status="cancelled"))["tasks"] == []
    assert [t["task_id"] for t in await listed_when(api, other, lambda tasks: len(tasks) == 1)] == [others]


async def test_pages_follow_each_other_with_next(api: httpx.AsyncClient, temporal: Client, users: list[User]) -> None:
    owner = users[0]
    for name in ("one", "two", "three"):
        await result_of(temporal, await create(api, owner, name=name))
    whole = await listed_when(api, owner, ended(3))

    pages = []
    cursor = None
    for _ in range(5):
        page = await listing(api, owner, limit=1, **({"next": cursor} if cursor else {}))
        pages.extend(page["tasks"])
        cursor = page["next"]
        if cursor is None:
            break

    assert pages == whole
    assert (await listing(api, owner, limit=3))["tasks"] == whole


@pytest.mark.parametrize(
    "params",
    [
        {"next": "not base64!"},
        {"next": base64.urlsafe_b64encode(b"\xff\xfe not json").decode()},
        {"next": base64.urlsafe_b64encode(b"[1, 2]").decode()},
        {"next": base64.urlsafe_b64encode(b"[" * 1500).decode()},
        {"next": base64.urlsafe_b64encode(json.dumps({"a": "x" * 2000}).encode()).decode()},
    ],
)
async def test_a_next_that_is_no_cursor_is_a_400(
    api: httpx.AsyncClient, users: list[User], params: dict[str, str]
) -> None:
    assert_error(await api.get(TASKS, params=params, headers=users[0].headers), 400, BAD_CURSOR)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"limit": 0}, "Invalid query parameter: 'limit' must be at least 1"),
        ({"limit": 201}, "Invalid query parameter: 'limit' must be at most 200"),
        ({"status": "done"}, "Invalid query parameter: 'status'"),
    ],
)
async def test_bad_query_parameters_are_a_400(
    api: httpx.AsyncClient, users: list[User], params: dict[str, Any], message: str
) -> None:
    response = await api.get(TASKS, params=params, headers=users[0].headers)
    assert response.status_code == 400
    assert response.json()["message"].startswith(message)


async def test_the_listing_needs_a_token(api: httpx.AsyncClient) -> None:
    assert_error(await api.get(TASKS), 401, "Missing or invalid Bearer token")


async def test_runs_no_worker_has_picked_up_are_listed(
    api: httpx.AsyncClient, temporal: Client, settings: Settings, engine: Engine, users: list[User]
) -> None:
    # The creation and the deletion carry their owner and state from their start: here on a task queue that no
    # worker polls, so no workflow code ever runs.
    owner = users[0]
    vmid = (await result_of(temporal, await create(api, owner))).vmid
    idle_queue = f"{settings.temporal_task_queue}-idle"
    admitter = Admitter(temporal, engine, idle_queue, timeout=0.5)
    request = CreateFromBoxInput(
        username=owner.name, box_id=BOX, name="queued", target="pve2", cpu_cores=1, memory_mb=512, disk_gb=20
    )
    with pytest.raises(ApiError) as refused:
        await admitter.admit("clone-idle-" + secrets.token_hex(4), request)
    assert refused.value.message == MSG_UNAVAILABLE
    deletion = await start_deletion(temporal, idle_queue, engine, deletable(engine, owner.name, vmid))
    try:
        tasks = await listed_when(api, owner, lambda tasks: len(tasks) == 3)

        running = [(t["kind"], t["status"], t["vm_name"], t["vmid"]) for t in tasks[:2]]
        # The deletion names its VM from the start: the API read the record before starting it.
        deleted_name = tasks[2]["vm_name"]
        assert sorted(running) == [
            ("create", "running", "queued", None),
            ("delete", "running", deleted_name, str(vmid)),
        ]
        assert deletion in [t["task_id"] for t in tasks[:2]]
        assert tasks[2]["status"] == "succeeded"
    finally:
        for run in [t async for t in temporal.list_workflows(f"TaskQueue = '{idle_queue}'")]:
            await temporal.get_workflow_handle(run.id).terminate()


async def test_a_reset_run_is_one_task(api: httpx.AsyncClient, temporal: Client, users: list[User]) -> None:
    owner = users[0]
    await api.post(CREATE, json=body(cpuCores=5), headers=owner.headers)
    [refusal] = await listed_when(api, owner, ended(1))
    task_id = refusal["task_id"]
    host = temporal.service_client.config.target_host
    reset = [TEMPORAL_BIN, "workflow", "reset", "-w", task_id, "-t", "FirstWorkflowTask", "--reason", "test"]
    await asyncio.to_thread(subprocess.run, [*reset, "--address", host], check=True, capture_output=True)
    with pytest.raises(WorkflowFailureError):  # refused again
        await temporal.get_workflow_handle(task_id).result()

    async def runs_listed() -> list[WorkflowExecutionStatus | None]:
        return [run.status async for run in temporal.list_workflows(f"WorkflowId = '{task_id}'")]

    for _ in range(100):
        if [status for status in await runs_listed() if status != WorkflowExecutionStatus.RUNNING] == [
            WorkflowExecutionStatus.FAILED
        ] * 2:
            break
        await asyncio.sleep(0.1)

    assert [task["task_id"] for task in (await listing(api, owner))["tasks"]] == [task_id]
    first_page = await listing(api, owner, limit=1)
    assert [task["task_id"] for task in first_page["tasks"]] == [task_id]
    # The older run is on the next page of visibility's listing: it is left out there too.
    assert first_page["next"] is None or (await listing(api, owner, limit=1, next=first_page["next"]))["tasks"] == []


async def test_no_username_can_widen_the_visibility_query(
    api: httpx.AsyncClient, temporal: Client, users: list[User]
) -> None:
    await api.post(CREATE, json=body(cpuCores=5), headers=users[0].headers)
    await listed_when(api, users[0], ended(1))
    # Whatever the username, it stays one string literal: no run has such an owner, so these list nothing (the
    # run above included), and none is a malformed query.
    for name in ["x' OR BoxOwner != '", "\\", "x\\' OR BoxOwner != \\'", 'a" OR "1"="1', "x' OR 'a'='a"]:
        assert [run.id async for run in temporal.list_workflows(tasks_query(name, None))] == []


def test_a_cursor_is_visibilitys_token_in_base64() -> None:
    token = json.dumps({"CloseTime": "2026-11-30T07:06:43Z", "RunID": "r"}).encode()
    assert decode_cursor(encode_cursor(token)) == token
