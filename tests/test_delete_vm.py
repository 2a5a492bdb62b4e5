"""DeleteVmWorkflow beyond the REST face (tests/api/test_vms.py): a VM without its creation's marker is never
touched and frees nothing until an operator forgets it, the operators' `boxctl vm delete` and `boxctl vm
forget`, PVE faults, a run started by another workflow's code, and replay of recorded deletions.

Recording the deletion's histories again (until the first release, in place):

    rm tests/histories/delete-1.0-*.json
    RECORD_HISTORIES=1.0 .venv/bin/pytest tests/test_delete_vm.py -k fresh_history -p no:cacheprovider
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine
from temporalio.client import Client, WorkflowFailureError, WorkflowHistory
from temporalio.exceptions import ApplicationError

import boxctl
import settings as settings_module
from db.quota import usage_of_user
from payloads import MSG_DELETE_FAILED, MSG_DELETED, MSG_VM_NOT_FOUND, MSG_VM_NOT_THE_SERVICES
from settings import Settings
from tests.conftest import created_vms, result_of, vm_records
from tests.factories import BOB, auth, body
from tests.recorded import Recorded
from tests.waiting import until
from workflows import DeleteVmInput, DeleteVmResult, DeleteVmWorkflow

API = "/api/v1/vm/manage"
SCENARIOS = ["success", "not_the_services"]
RECORDED = Recorded("delete-", DeleteVmWorkflow, SCENARIOS)

pytestmark = pytest.mark.usefixtures("worker")
Cli = Callable[..., Awaitable[int]]


@pytest.fixture
def cli(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cli]:
    """boxctl in a thread (it runs its own event loop), on the test's database and Temporal task queue."""

    async def run(*argv: str) -> int:
        monkeypatch.setenv("DATABASE_URL", settings.database_url.get_secret_value())
        monkeypatch.setenv("TEMPORAL_ADDRESS", settings.temporal_address)
        monkeypatch.setenv("TEMPORAL_TASK_QUEUE", settings.temporal_task_queue)
        settings_module.get_settings.cache_clear()
        return await asyncio.to_thread(boxctl.main, list(argv))

    yield run
    settings_module.get_settings.cache_clear()


async def create(api: httpx.AsyncClient, temporal: Client, **overrides: Any) -> dict[str, Any]:
    response = await api.post(f"{API}/createFromBoxTemplate", json=body(**overrides), headers=auth())
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()["data"]
    await result_of(temporal, data["task_id"])
    return data


async def start_delete(api: httpx.AsyncClient, vmid: str) -> str:
    response = await api.delete(f"{API}/vms/{vmid}", headers=auth())
    assert response.status_code == 200, response.text
    task_id: str = response.json()["data"]["task_id"]
    return task_id


async def ending(temporal: Client, task_id: str) -> tuple[DeleteVmResult | ApplicationError, dict[str, Any]]:
    """How the deletion ended (its result, or the ApplicationError it failed with) and its task state."""
    handle = temporal.get_workflow_handle(task_id, result_type=DeleteVmResult)
    outcome: DeleteVmResult | ApplicationError
    try:
        outcome = await asyncio.wait_for(handle.result(), 60)
    except WorkflowFailureError as exc:
        assert isinstance(exc.cause, ApplicationError)
        outcome = exc.cause
    state: dict[str, Any] = (await (await handle.describe()).memo())["state"]
    return outcome, state


def pretend_made_by_hand(pve: Any, vmid: int) -> None:
    """The VMID now holds a VM whose notes carry no marker: reused outside the service, or edited by hand."""
    pve.vm(vmid).config["description"] = "my own VM, hands off"


def used_vms(engine: Engine) -> int:
    return usage_of_user(engine, "alice").vms


# ------------------------------------------------------------------------------ the marker


async def test_a_vm_without_the_marker_is_never_destroyed_and_frees_nothing_until_forgotten(
    api: httpx.AsyncClient, temporal: Client, pve: Any, engine: Engine, cli: Cli
) -> None:
    await create(api, temporal)
    pretend_made_by_hand(pve, 100)

    outcome, state = await ending(temporal, await start_delete(api, "100"))

    assert isinstance(outcome, ApplicationError)
    assert outcome.message == MSG_VM_NOT_THE_SERVICES
    assert (state["kind"], state["step"], state["result_code"]) == ("delete", "done", 409)
    assert state["result_message"] == MSG_VM_NOT_THE_SERVICES
    assert [vm.vmid for vm in created_vms(pve)] == [100]
    assert used_vms(engine) == 1
    assert [vm.deleting_task_id for vm in vm_records(engine)] == [None]

    assert await cli("vm", "forget", "100") == 0

    assert used_vms(engine) == 0
    assert [vm.vmid for vm in created_vms(pve)] == [100], "forget never touches PVE"
    assert (await api.delete(f"{API}/vms/100", headers=auth())).json()["message"] == MSG_VM_NOT_FOUND


async def test_forget_waits_for_a_deletion_under_way_unless_forced(
    api: httpx.AsyncClient, temporal: Client, pve: Any, engine: Engine, cli: Cli, capsys: pytest.CaptureFixture[str]
) -> None:
    await create(api, temporal)
    pve.slow_network(1.5, node="pve2")  # each of the deletion's PVE requests takes 1.5 s
    task_id = await start_delete(api, "100")
    await until(lambda: [vm.deleting_task_id for vm in vm_records(engine)] == [task_id])

    assert await cli("vm", "forget", "100") == 1
    assert f"VM 100 is being deleted by task {task_id}" in capsys.readouterr().err
    assert used_vms(engine) == 1

    assert await cli("vm", "forget", "100", "--force") == 0
    assert used_vms(engine) == 0
    pve.slow_network(0, node="pve2")
    outcome, _state = await ending(temporal, task_id)
    assert isinstance(outcome, DeleteVmResult), outcome  # the deletion still ends well, and PVE has no VM
    assert created_vms(pve) == []
    assert [vm.deleted_at is not None for vm in vm_records(engine)] == [True]


async def test_forget_names_a_vmid_no_record_holds(cli: Cli, capsys: pytest.CaptureFixture[str]) -> None:
    assert await cli("vm", "forget", "100") == 1
    assert "no VM record holds VMID 100" in capsys.readouterr().err
    assert await cli("vm", "delete", "abc") == 1


# --------------------------------------------------------------------------------- operators


async def test_an_operator_deletes_any_users_vm(
    api: httpx.AsyncClient, temporal: Client, pve: Any, engine: Engine, cli: Cli, capsys: pytest.CaptureFixture[str]
) -> None:
    made = await create(api, temporal)
    capsys.readouterr()

    assert await cli("vm", "delete", "100") == 0

    task_id = capsys.readouterr().out.strip()
    assert task_id == f"delete-{made['task_id']}"
    outcome, state = await ending(temporal, task_id)
    assert isinstance(outcome, DeleteVmResult)
    assert (state["owner"], state["result_code"], state["result_message"]) == ("alice", 200, MSG_DELETED)
    assert created_vms(pve) == []
    assert used_vms(engine) == 0


# ------------------------------------------------------------------------------- PVE faults


async def test_passing_pve_faults_are_retried(
    api: httpx.AsyncClient, temporal: Client, pve: Any, engine: Engine
) -> None:
    await create(api, temporal)
    pve.fail(
        "DELETE",
        "/nodes/pve2/qemu/100",
        500,
        "can't lock file '/var/lock/qemu-server/lock-100.conf' - got timeout",
        times=2,
    )
    pve.fail("GET", "/cluster/resources", 503, "cluster not ready - no quorum", times=1)

    outcome, _state = await ending(temporal, await start_delete(api, "100"))

    assert isinstance(outcome, DeleteVmResult), outcome
    assert pve.failures == {}, "every fault was met, and ridden over"
    assert created_vms(pve) == []
    assert used_vms(engine) == 0


async def test_a_final_pve_error_fails_the_deletion_and_frees_nothing(
    api: httpx.AsyncClient, temporal: Client, pve: Any, engine: Engine
) -> None:
    await create(api, temporal)
    pve.fail("POST", "/nodes/pve2/qemu/100/status/stop", 403, "Permission check failed (/vms/100, VM.PowerMgmt)")
    pve.vm(100).status = "running"

    outcome, state = await ending(temporal, await start_delete(api, "100"))

    assert isinstance(outcome, ApplicationError) and outcome.message == MSG_DELETE_FAILED
    assert (state["step"], state["result_code"]) == ("done", 500)
    assert [vm.vmid for vm in created_vms(pve)] == [100]
    assert used_vms(engine) == 1


# -------------------------------------------------------------------------- run by other code


async def test_started_by_other_code_it_deletes_only_the_owners_vm(
    api: httpx.AsyncClient, temporal: Client, pve: Any, engine: Engine, settings: Settings
) -> None:
    await create(api, temporal)

    async def run(username: str) -> DeleteVmResult | BaseException:
        try:
            return await temporal.execute_workflow(
                DeleteVmWorkflow.run,
                DeleteVmInput(username=username, vmid=100),
                id=f"delete-by-parent-{uuid.uuid4().hex[:8]}",
                task_queue=settings.temporal_task_queue,
            )
        except WorkflowFailureError as exc:
            return exc.cause

    refused = await run("bob")
    assert isinstance(refused, ApplicationError) and refused.message == MSG_VM_NOT_FOUND
    assert [vm.vmid for vm in created_vms(pve)] == [100]

    done = await run("alice")
    assert isinstance(done, DeleteVmResult)
    assert (done.vmid, done.vm_name, done.node) == (100, "my-new-vm-from-box", "pve2")
    assert created_vms(pve) == []
    assert (await api.get(f"{API}/vms", headers=auth(BOB))).json()["data"]["vms"] == []


# ------------------------------------------------------------------------------------- replay


async def run_scenario(api: httpx.AsyncClient, temporal: Client, pve: Any, scenario: str) -> WorkflowHistory:
    await create(api, temporal)
    if scenario == "not_the_services":
        pretend_made_by_hand(pve, 100)
    task_id = await start_delete(api, "100")
    outcome, _state = await ending(temporal, task_id)
    assert isinstance(outcome, DeleteVmResult) == (scenario == "success"), outcome
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
