"""The saga: a clone that fails leaves nothing; a configuration that fails destroys the VM and gives the
quota back; a cancelled run is cleaned up; a request nobody admits in time answers 503 and never acts."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError
from temporalio.exceptions import ApplicationError
from temporalio.worker import Worker

from db.models import COMMITTED, HELD, RELEASED
from payloads import MSG_CLONE_FAILED, MSG_CONFIGURE_FAILED, MSG_CREATED, MSG_UNAVAILABLE
from settings import Settings
from tests.conftest import created_vms, reservations, result_of, vm_records
from tests.factories import auth, body
from tests.waiting import until, until_async

CREATE = "/api/v1/vm/manage/createFromBoxTemplate"
GIB = 1024**3


async def failure_of(temporal: Client, task_id: str) -> ApplicationError:
    with pytest.raises(WorkflowFailureError) as caught:
        await result_of(temporal, task_id)
    assert isinstance(caught.value.cause, ApplicationError)
    return caught.value.cause


async def state(api: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    return (await api.get(f"/api/v1/vm/manage/tasks/{task_id}", headers=auth())).json()["data"]  # type: ignore[no-any-return]


def assert_cleaned_up(pve: Any, engine: Engine) -> None:
    assert created_vms(pve) == []
    assert vm_records(engine) == []
    assert reservations(engine, HELD) == []
    assert [r.state for r in reservations(engine)] in ([], [RELEASED])


def no_space_on_nfs(pve: Any) -> None:
    """The clone task itself fails: the template's 10 GiB disk does not fit."""
    pve.storages["NFS"]["avail"] = GIB


def clone_refused(pve: Any) -> None:
    pve.fail("POST", "/nodes/pve1/qemu/9000/clone", error="clone_failed")


@pytest.mark.usefixtures("worker")
@pytest.mark.parametrize("fault", [no_space_on_nfs, clone_refused])
async def test_failed_clone_leaves_nothing(
    api: httpx.AsyncClient, temporal: Client, pve: Any, engine: Engine, fault: Callable[[Any], None]
) -> None:
    fault(pve)
    response = await api.post(CREATE, json=body(), headers=auth())
    assert response.status_code == 200  # admitted: the clone fails afterwards
    task_id = response.json()["data"]["task_id"]

    error = await failure_of(temporal, task_id)
    assert error.message == MSG_CLONE_FAILED

    assert_cleaned_up(pve, engine)
    assert [r.state for r in reservations(engine)] == [RELEASED]
    seen = await state(api, task_id)
    assert (seen["status"], seen["step"], seen["result_code"], seen["result_message"]) == (
        "failed",
        "done",
        500,
        MSG_CLONE_FAILED,
    )


@pytest.mark.usefixtures("worker")
async def test_failed_clone_with_wait_answers_500(api: httpx.AsyncClient, pve: Any, engine: Engine) -> None:
    no_space_on_nfs(pve)
    response = await api.post(CREATE + "?wait=30", json=body(), headers=auth())
    assert response.status_code == 500
    assert response.json() == {"code": 500, "message": MSG_CLONE_FAILED, "data": None}
    assert_cleaned_up(pve, engine)


def config_refused(pve: Any) -> None:
    pve.fail("PUT", "/nodes/pve2/qemu/100/config", 500, "unable to apply the new configuration")


def resize_refused(pve: Any) -> None:
    pve.fail("PUT", "/nodes/pve2/qemu/100/resize", 500, "disk 'scsi0' cannot be resized")


@pytest.mark.usefixtures("worker")
@pytest.mark.parametrize("fault", [config_refused, resize_refused])
async def test_failed_configuration_destroys_the_vm_and_releases_the_quota(
    api: httpx.AsyncClient, temporal: Client, pve: Any, engine: Engine, fault: Callable[[Any], None]
) -> None:
    fault(pve)
    response = await api.post(CREATE, json=body(), headers=auth())
    task_id = response.json()["data"]["task_id"]

    error = await failure_of(temporal, task_id)
    assert error.message == MSG_CONFIGURE_FAILED

    assert_cleaned_up(pve, engine)
    destroys = [r for r in pve.requests if r[0] == "DELETE" and r[1].endswith("/nodes/pve2/qemu/100")]
    assert len(destroys) == 1
    seen = await state(api, task_id)
    assert (seen["status"], seen["result_code"], seen["result_message"]) == ("failed", 500, MSG_CONFIGURE_FAILED)

    # The quota came back: the same request fits again once PVE behaves.
    pve.failures.clear()
    again = await api.post(CREATE + "?wait=30", json=body(), headers=auth())
    assert again.json()["message"] == MSG_CREATED


@pytest.mark.usefixtures("worker")
async def test_failed_configuration_with_wait_answers_500(api: httpx.AsyncClient, pve: Any, engine: Engine) -> None:
    config_refused(pve)
    response = await api.post(CREATE + "?wait=30", json=body(), headers=auth())
    assert response.status_code == 500
    assert response.json() == {"code": 500, "message": MSG_CONFIGURE_FAILED, "data": None}
    assert_cleaned_up(pve, engine)


@pytest.mark.usefixtures("worker")
async def test_a_config_lock_held_for_a_moment_is_retried(
    api: httpx.AsyncClient, temporal: Client, pve: Any, engine: Engine
) -> None:
    pve.fail("PUT", "/nodes/pve2/qemu/100/config", error="config_lock_timeout", times=2)
    task_id = (await api.post(CREATE, json=body(), headers=auth())).json()["data"]["task_id"]
    result = await result_of(temporal, task_id)
    assert result.vmid == 100
    [vm] = created_vms(pve)
    assert vm.config["cores"] == "2"
    assert [r.state for r in reservations(engine)] == [COMMITTED]


STRANGER = "clone-someone-else-1-abc"


def replaced_by_a_strangers_vm(pve: Any) -> None:
    """The run's VM is destroyed (by hand, or by the repair tool), and another creation's VM takes the VMID."""
    pve.vms.remove(pve.vm(100))
    pve.add_vm(
        100,
        "strangers-vm",
        node="pve2",
        config={"cores": 4, "memory": 4096, "description": f"pve-boxes task {STRANGER}"},
    )


def destroyed_by_hand(pve: Any) -> None:
    pve.vms.remove(pve.vm(100))


@pytest.mark.usefixtures("worker")
@pytest.mark.parametrize("vanish", [replaced_by_a_strangers_vm, destroyed_by_hand])
async def test_a_run_whose_vm_vanished_before_configuration_fails_and_touches_no_other_vm(
    api: httpx.AsyncClient, temporal: Client, pve: Any, engine: Engine, vanish: Callable[[Any], None]
) -> None:
    # The config write meets a lock twice (in the clone's activity, then in the configuration's first attempt) and
    # is retried a second later; meanwhile the VM is gone.
    pve.fail("PUT", "/nodes/pve2/qemu/100/config", error="config_lock_timeout", times=2)
    task_id = (await api.post(CREATE, json=body(), headers=auth())).json()["data"]["task_id"]
    await until(lambda: any(r[0] == "PUT" and r[1].endswith("/qemu/100/config") for r in pve.requests), timeout=30)
    vanish(pve)

    error = await failure_of(temporal, task_id)
    assert error.message == MSG_CONFIGURE_FAILED
    seen = await state(api, task_id)
    assert (seen["status"], seen["result_code"], seen["result_message"]) == ("failed", 500, MSG_CONFIGURE_FAILED)
    # Whatever holds VMID 100 now was neither configured nor destroyed; the run's quota came back.
    stranger = pve.vm(100)
    if stranger is not None:
        assert (stranger.config["cores"], stranger.config["memory"]) == (4, 4096)
        assert "tags" not in stranger.config
    assert not [r for r in pve.requests if r[0] in ("DELETE", "POST") and "/qemu/100" in r[1]]
    assert [r.state for r in reservations(engine)] == [RELEASED]
    assert vm_records(engine) == []


@pytest.mark.usefixtures("worker")
@pytest.mark.fakepve(time_scale=1)
async def test_cancelled_during_the_clone_is_cleaned_up(
    api: httpx.AsyncClient, temporal: Client, pve: Any, engine: Engine
) -> None:
    pve.add_ceph_storage("ceph")
    pve.ceph_slow(3)  # the clone onto ceph takes 3 s
    task_id = (await api.post(CREATE, json=body(storage="ceph"), headers=auth())).json()["data"]["task_id"]
    await until(lambda: any(vm.lock == "clone" for vm in created_vms(pve)))
    # The run's memo still holds its first state: the step and the VMID come from BoxStep and VmId.
    seen = await state(api, task_id)
    assert (seen["step"], seen["vmid"]) == ("clone", str(created_vms(pve)[0].vmid))

    await temporal.get_workflow_handle(task_id).cancel()

    handle = temporal.get_workflow_handle(task_id)
    await until_async(lambda: described_status(handle), WorkflowExecutionStatus.CANCELED, timeout=30)
    assert_cleaned_up(pve, engine)
    seen = await state(api, task_id)
    # The clone never completed, so the run reports the clone as failed (and cleaned up).
    assert (seen["status"], seen["result_code"], seen["result_message"]) == ("cancelled", 500, MSG_CLONE_FAILED)


@pytest.mark.usefixtures("worker")
@pytest.mark.fakepve(time_scale=1)
async def test_cancelled_while_the_clone_request_is_on_its_way_leaves_nothing(
    api: httpx.AsyncClient, temporal: Client, pve: Any, engine: Engine
) -> None:
    # PVE takes 2 s to answer anything about pve1, where the template is: the clone request is in flight
    # when the operator cancels, and PVE makes the clone after the run has been told to stop.
    task_id = (await api.post(CREATE, json=body(), headers=auth())).json()["data"]["task_id"]
    pve.slow_network(2.0, node="pve1")

    async def step() -> str:
        return str((await state(api, task_id))["step"])

    await until_async(step, "clone")
    await asyncio.sleep(0.5)
    await temporal.get_workflow_handle(task_id).cancel()

    handle = temporal.get_workflow_handle(task_id)
    await until_async(lambda: described_status(handle), WorkflowExecutionStatus.CANCELED, timeout=30)
    await asyncio.sleep(3)  # long after the clone request has reached PVE
    assert_cleaned_up(pve, engine)
    assert [r for r in pve.requests if r[0] == "POST" and r[1].endswith("/clone")]  # the clone was asked for


@pytest.mark.fakepve(time_scale=1)
async def test_no_worker_answers_503_and_the_request_never_acts(
    temporal: Client, settings: Settings, pve: Any, engine: Engine
) -> None:
    from api.app import create_app
    from tests.conftest import ACTIVITY_THREADS, PveClient, ThreadPoolExecutor, build_worker

    settings.admission_timeout_seconds = 2
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as api,
    ):
        posted = time.monotonic()
        response = await api.post(CREATE, json=body(), headers=auth())
        # Within ADMISSION_TIMEOUT_SECONDS (and the cancellation's round trip), not a grace period after it.
        assert time.monotonic() - posted < 3.5  # 4 s and more when the POST waited 2 s past the setting
        assert response.status_code == 503
        assert response.json() == {"code": 503, "message": MSG_UNAVAILABLE, "data": None}
        [run] = [r async for r in temporal.list_workflows(f"TaskQueue = '{settings.temporal_task_queue}'")]

        # A worker turns up later: the run must end without creating anything.
        with ThreadPoolExecutor(ACTIVITY_THREADS) as executor:
            async with build_worker(
                temporal, settings.temporal_task_queue, engine, PveClient(settings), settings, executor
            ):
                handle = temporal.get_workflow_handle(run.id)
                await until_async(lambda: closed(handle), True, timeout=30)
        assert created_vms(pve) == []
        assert reservations(engine) == []
        assert not [r for r in pve.requests if r[0] != "GET" and "/access/ticket" not in r[1]]


@pytest.mark.usefixtures("worker")
async def test_pve_unreachable_at_admission_answers_503_and_leaves_nothing(
    settings: Settings, temporal: Client, pve: Any, engine: Engine
) -> None:
    from api.app import create_app

    settings.admission_timeout_seconds = 3
    pve.flaky_network(drop_rate=1.0)
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as api,
    ):
        response = await api.post(CREATE, json=body(), headers=auth())
        assert response.status_code == 503
        assert response.json()["message"] == MSG_UNAVAILABLE
    pve.flaky_network(drop_rate=0.0)
    [run] = [r async for r in temporal.list_workflows(f"TaskQueue = '{settings.temporal_task_queue}'")]
    await until_async(lambda: closed(temporal.get_workflow_handle(run.id)), True, timeout=30)
    assert created_vms(pve) == []
    assert reservations(engine, HELD) == []


# --------------------------------------------------------------------------- helpers


async def described_status(handle: Any) -> Any:
    return (await handle.describe()).status


async def closed(handle: Any) -> bool:
    return (await handle.describe()).close_time is not None


__all__ = ["Worker"]
