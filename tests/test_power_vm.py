"""POST vms/{vmid}/power and PowerVmWorkflow, end to end: the real API, worker and Temporal dev server against
fakepve. Each action changes the VM's state on PVE; another user's VM is a 404; a VM being created or deleted
is a 409; a VM without its creation's marker is never touched; a retry never asks PVE twice; and recorded
power histories replay.

Recording the power histories again (until the first release, in place):

    rm tests/histories/power-1.0-*.json
    RECORD_HISTORIES=1.0 .venv/bin/pytest tests/test_power_vm.py -k fresh_history -p no:cacheprovider
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine
from temporalio.client import Client, WorkflowFailureError, WorkflowHistory
from temporalio.exceptions import ApplicationError

from db import vms
from db.quota import Size, reserve
from payloads import (
    MSG_POWER_DONE,
    MSG_POWER_STARTED,
    MSG_VM_BEING_CREATED,
    MSG_VM_BEING_DELETED,
    MSG_VM_NOT_FOUND,
    MSG_VM_NOT_RUNNING,
    MSG_VM_NOT_THE_SERVICES,
)
from settings import Settings
from tests.conftest import result_of
from tests.factories import BOB, auth, body
from tests.recorded import Recorded
from workflows import PowerVmInput, PowerVmResult, PowerVmWorkflow

API = "/api/v1/vm/manage"
SCENARIOS = ["success", "not_the_services"]
RECORDED = Recorded("power-", PowerVmWorkflow, SCENARIOS)

pytestmark = pytest.mark.usefixtures("worker")


async def create(api: httpx.AsyncClient, temporal: Client) -> str:
    """Alice's VM, made (stopped, as a clone is): its VMID."""
    response = await api.post(f"{API}/createFromBoxTemplate", json=body(), headers=auth())
    assert response.status_code == 200, response.text
    await result_of(temporal, response.json()["data"]["task_id"])
    vmid: str = response.json()["data"]["vmid"]
    return vmid


async def power(
    api: httpx.AsyncClient, vmid: str, action: Any, token: str | None = None, **extra: Any
) -> httpx.Response:
    return await api.post(
        f"{API}/vms/{vmid}/power", json={"action": action, **extra}, headers=auth(*([token] if token else []))
    )


async def started(api: httpx.AsyncClient, vmid: str, action: str) -> str:
    response = await power(api, vmid, action)
    assert response.status_code == 200, response.text
    assert response.json()["message"] == MSG_POWER_STARTED
    data = response.json()["data"]
    assert data["vmid"] == vmid and data["task_id"].startswith("power-")
    task_id: str = data["task_id"]
    return task_id


async def ending(temporal: Client, task_id: str) -> PowerVmResult | ApplicationError:
    handle = temporal.get_workflow_handle(task_id, result_type=PowerVmResult)
    try:
        return await asyncio.wait_for(handle.result(), 60)
    except WorkflowFailureError as exc:
        assert isinstance(exc.cause, ApplicationError)
        return exc.cause


async def task_state(api: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    response = await api.get(f"{API}/tasks/{task_id}", headers=auth())
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()["data"]
    return data


def pve_tasks(pve: Any, kind: str) -> int:
    return sum(1 for task in pve.tasklog if task["type"] == kind and task["id"] == "100")


# ------------------------------------------------------------------------------- the actions


async def test_each_action_changes_the_vms_state_on_pve(api: httpx.AsyncClient, temporal: Client, pve: Any) -> None:
    vmid = await create(api, temporal)
    vm = pve.vm(100)
    assert vm.status == "stopped"

    for action, status in [("start", "running"), ("reboot", "running"), ("shutdown", "stopped")]:
        task_id = await started(api, vmid, action)
        assert isinstance(await ending(temporal, task_id), PowerVmResult)
        assert vm.status == status, action
        state = await task_state(api, task_id)
        assert (state["status"], state["kind"], state["step"]) == ("succeeded", "power", "done")
        assert (state["result_code"], state["result_message"]) == (200, MSG_POWER_DONE)
        assert (state["vmid"], state["vm_name"], state["node"]) == ("100", "my-new-vm-from-box", "pve2")
    assert pve_tasks(pve, "qmreboot") == 1, "the reboot went through PVE"

    await ending(temporal, await started(api, vmid, "start"))
    assert vm.status == "running"
    await ending(temporal, await started(api, vmid, "stop"))
    assert vm.status == "stopped"


async def test_an_action_the_vm_needs_not_is_done_without_asking_pve(
    api: httpx.AsyncClient, temporal: Client, pve: Any
) -> None:
    vmid = await create(api, temporal)

    for action in ["stop", "shutdown"]:
        assert isinstance(await ending(temporal, await started(api, vmid, action)), PowerVmResult)

    assert pve.vm(100).status == "stopped"
    assert pve_tasks(pve, "qmstop") + pve_tasks(pve, "qmshutdown") == 0


async def test_a_reboot_of_a_stopped_vm_fails_and_starts_nothing(
    api: httpx.AsyncClient, temporal: Client, pve: Any
) -> None:
    vmid = await create(api, temporal)

    task_id = await started(api, vmid, "reboot")

    outcome = await ending(temporal, task_id)
    assert isinstance(outcome, ApplicationError) and outcome.message == MSG_VM_NOT_RUNNING
    state = await task_state(api, task_id)
    assert (state["status"], state["result_code"], state["result_message"]) == ("failed", 409, MSG_VM_NOT_RUNNING)
    assert pve.vm(100).status == "stopped"


async def test_a_retry_awaits_the_task_an_earlier_attempt_started_instead_of_asking_again(
    api: httpx.AsyncClient, temporal: Client, pve: Any
) -> None:
    vmid = await create(api, temporal)
    pve.vm(100).status = "running"
    # The reboot is asked for; the first look at its task fails: the attempt ends, and the next one finds it.
    pve.fail("GET", "/status", 503, "Service Unavailable", times=1)

    outcome = await ending(temporal, await started(api, vmid, "reboot"))

    assert isinstance(outcome, PowerVmResult), outcome
    assert pve.failures == {}, "the fault was met"
    assert pve_tasks(pve, "qmreboot") == 1, "one reboot, not two"


# ---------------------------------------------------------------------------- who and when


async def test_another_users_vm_is_not_found(api: httpx.AsyncClient, temporal: Client, pve: Any) -> None:
    vmid = await create(api, temporal)
    for token, target in [(BOB, vmid), (None, "999"), (None, "abc")]:
        response = await power(api, target, "start", token)
        assert (response.status_code, response.json()["message"]) == (404, MSG_VM_NOT_FOUND)
    assert pve.vm(100).status == "stopped"


async def test_a_vm_being_created_or_deleted_is_a_409(api: httpx.AsyncClient, temporal: Client, engine: Engine) -> None:
    vmid = await create(api, temporal)
    reserve(engine, "clone-under-way", "alice", Size(1, 1024, 10), [[105, 105]])
    vms.begin_deletion(engine, "alice", 100, "delete-under-way")

    response = await power(api, "105", "start")
    assert (response.status_code, response.json()["message"]) == (409, MSG_VM_BEING_CREATED)
    response = await power(api, vmid, "start")
    assert (response.status_code, response.json()["message"]) == (409, MSG_VM_BEING_DELETED)


async def test_the_run_itself_refuses_a_vm_being_deleted(
    api: httpx.AsyncClient, temporal: Client, pve: Any, engine: Engine, settings: Settings
) -> None:
    """Another workflow's code, or a deletion begun after the API looked: the run checks again."""
    await create(api, temporal)
    vms.begin_deletion(engine, "alice", 100, "delete-under-way")

    with pytest.raises(WorkflowFailureError) as failed:
        await temporal.execute_workflow(
            PowerVmWorkflow.run,
            PowerVmInput(username="alice", vmid=100, action="start"),
            id=f"power-by-parent-{uuid.uuid4().hex[:8]}",
            task_queue=settings.temporal_task_queue,
        )

    assert isinstance(failed.value.cause, ApplicationError)
    assert failed.value.cause.message == MSG_VM_BEING_DELETED
    assert pve.vm(100).status == "stopped"


async def test_a_vm_without_the_marker_is_never_touched(api: httpx.AsyncClient, temporal: Client, pve: Any) -> None:
    vmid = await create(api, temporal)
    pve.vm(100).config["description"] = "my own VM, hands off"

    task_id = await started(api, vmid, "start")

    outcome = await ending(temporal, task_id)
    assert isinstance(outcome, ApplicationError) and outcome.message == MSG_VM_NOT_THE_SERVICES
    state = await task_state(api, task_id)
    assert (state["status"], state["result_code"]) == ("failed", 409)
    assert pve.vm(100).status == "stopped"


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"action": "hibernate"}, "Invalid request body: 'action': "),
        ({"action": "start", "force": True}, "Invalid request body: unknown field 'force'"),
        ({}, "Invalid request body: 'action' is required"),
    ],
)
async def test_a_bad_body_is_a_400_naming_the_field(
    api: httpx.AsyncClient, temporal: Client, payload: dict[str, Any], message: str
) -> None:
    vmid = await create(api, temporal)
    response = await api.post(f"{API}/vms/{vmid}/power", json=payload, headers=auth())
    assert response.status_code == 400, response.text
    assert response.json()["message"].startswith(message)


# ------------------------------------------------------------------------------------- replay


async def run_scenario(api: httpx.AsyncClient, temporal: Client, pve: Any, scenario: str) -> WorkflowHistory:
    vmid = await create(api, temporal)
    if scenario == "not_the_services":
        pve.vm(100).config["description"] = "my own VM, hands off"
    task_id = await started(api, vmid, "start")
    outcome = await ending(temporal, task_id)
    assert isinstance(outcome, PowerVmResult) == (scenario == "success"), outcome
    return await temporal.get_workflow_handle(task_id).fetch_history()


@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_fresh_history_replays(api: httpx.AsyncClient, temporal: Client, pve: Any, scenario: str) -> None:
    await RECORDED.replay_fresh(await run_scenario(api, temporal, pve, scenario), scenario)


def test_every_version_has_every_scenario_recorded() -> None:
    RECORDED.assert_every_scenario_recorded()


@pytest.mark.parametrize("path", RECORDED.paths(), ids=lambda path: path.stem)
async def test_recorded_history_replays(path: Path) -> None:
    scenario, last = await RECORDED.replay(path)
    if scenario == "success":
        assert last.HasField("workflow_execution_completed_event_attributes")
    else:
        assert last.workflow_execution_failed_event_attributes.failure.message == MSG_VM_NOT_THE_SERVICES
