"""Several API processes and workers against one PVE: the quota is exact, VMIDs never collide, an
Idempotency-Key makes a retried POST create nothing new, and clone storms wait their turn."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine
from sqlmodel import select
from temporalio.client import Client

from db.engine import session
from db.models import COMMITTED, HELD, CloneGrant, CloneSlot, CloneWaiter
from dev.stack import Stack, free_port, settings_env
from payloads import MSG_CREATED, MSG_TOTAL_LIMIT
from settings import Settings
from tests.conftest import created_vms, reservations, result_of, vm_records
from tests.factories import ALICE, BOB, auth, body

CREATE = "/api/v1/vm/manage/createFromBoxTemplate"


@pytest.fixture
async def two_of_each(settings: Settings, engine: Engine, tmp_path: Path) -> AsyncIterator[list[str]]:
    """Two worker processes and two API processes on the same database, Temporal and PVE."""
    processes = Stack(tmp_path)
    env = settings_env(settings)
    try:
        for i in (1, 2):
            processes.worker(env, f"worker{i}")
        apis = [processes.api(env, free_port(), f"api{i}") for i in (1, 2)]
        for api in apis:
            await api.ready()
        yield [api.url for api in apis]
    finally:
        processes.stop()


async def settle(temporal: Client, answers: list[httpx.Response]) -> None:
    for answer in answers:
        if answer.status_code == 200:
            await result_of(temporal, answer.json()["data"]["task_id"], timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
async def test_parallel_requests_through_two_api_processes_admit_exactly_what_fits(
    two_of_each: list[str], temporal: Client, pve: Any, engine: Engine
) -> None:
    # Plan "small" allows 8 cores in total: of 16 requests of 2 cores, exactly 4 fit.
    async with httpx.AsyncClient(timeout=60) as client:
        answers = await asyncio.gather(
            *(
                client.post(
                    two_of_each[i % 2] + CREATE,
                    json=body(name=f"race-{i}", cpuCores=2, memorySize=1024, diskSize=10),
                    headers=auth(),
                )
                for i in range(16)
            )
        )
    codes = sorted(answer.status_code for answer in answers)
    assert codes == [200] * 4 + [400] * 12, [a.text for a in answers]
    assert {a.json()["message"] for a in answers if a.status_code == 400} == {MSG_TOTAL_LIMIT}
    vmids = [a.json()["data"]["vmid"] for a in answers if a.status_code == 200]
    assert len(set(vmids)) == 4

    await settle(temporal, answers)
    assert sorted(str(vm.vmid) for vm in created_vms(pve)) == sorted(vmids)
    assert sorted(r.state for r in reservations(engine)) == [COMMITTED] * 4
    assert sum(vm.cores for vm in vm_records(engine)) == 8


@pytest.mark.slow
async def test_idempotency_key_across_api_processes(
    two_of_each: list[str], temporal: Client, pve: Any, engine: Engine
) -> None:
    key = {"Idempotency-Key": "order-4711"}
    async with httpx.AsyncClient(timeout=60) as client:
        answers = await asyncio.gather(
            *(client.post(two_of_each[i % 2] + CREATE, json=body(), headers={**auth(), **key}) for i in range(6))
        )
        assert {a.status_code for a in answers} == {200}
        assert len({a.text for a in answers}) == 1  # every repeat got the first answer, word for word
        await settle(temporal, answers[:1])

        # After the run has ended, a retry still answers what the first request answered.
        late = await client.post(two_of_each[1] + CREATE, json=body(), headers={**auth(), **key})
        assert late.text == answers[0].text

        # The same key with another request is refused, and creates nothing.
        other = await client.post(two_of_each[0] + CREATE, json=body(cpuCores=1), headers={**auth(), **key})
        assert other.status_code == 422
        assert other.json() == {
            "code": 422,
            "message": "This Idempotency-Key was already used with a different request",
            "data": None,
        }

        # Keys belong to their user.
        bobs = await client.post(two_of_each[0] + CREATE, json=body(), headers={**auth(BOB), **key})
        assert bobs.status_code == 403

    assert len(created_vms(pve)) == 1
    assert len(reservations(engine)) == 1


@pytest.mark.usefixtures("worker")
async def test_idempotency_key_repeats_a_refusal(api: httpx.AsyncClient, pve: Any, engine: Engine) -> None:
    key = {"Idempotency-Key": "too-big"}
    first = await api.post(CREATE, json=body(cpuCores=99), headers={**auth(), **key})
    again = await api.post(CREATE, json=body(cpuCores=99), headers={**auth(), **key})
    assert first.status_code == again.status_code == 400
    assert first.json() == again.json()
    assert created_vms(pve) == [] and reservations(engine) == []


@pytest.mark.usefixtures("worker")
async def test_a_keyed_repeat_as_the_run_ends_answers_the_first_200(
    api: httpx.AsyncClient, temporal: Client, pve: Any, engine: Engine
) -> None:
    # Found by the fuzz run: a repeat that asked for the admission just as the run closed got 503 "nothing was
    # created", though the VM was made; a client that believed it and retried without the key got a second VM.
    key = {"Idempotency-Key": "as-it-ends"}
    first = await api.post(CREATE, json=body(), headers={**auth(), **key})
    assert first.status_code == 200, first.text
    ended = asyncio.ensure_future(result_of(temporal, first.json()["data"]["task_id"]))
    answers: list[httpx.Response] = []
    while not ended.done() or len(answers) < 5:  # repeats before, during and after the run's end
        answers.append(await api.post(CREATE, json=body(), headers={**auth(), **key}))
    await ended
    assert {(a.status_code, a.json()["data"]["vmid"] if a.status_code == 200 else a.text) for a in answers} == {
        (200, first.json()["data"]["vmid"])
    }
    assert len(created_vms(pve)) == 1 and len(vm_records(engine)) == 1


# ------------------------------------------------------------------------------ clone storms


@pytest.mark.usefixtures("one_clone_per_node", "worker")
@pytest.mark.fakepve(time_scale=1)
async def test_clones_over_the_limit_wait_their_turn(
    api: httpx.AsyncClient, temporal: Client, pve: Any, engine: Engine
) -> None:
    pve.add_ceph_storage("ceph")
    pve.ceph_slow(1)
    answers = [
        await api.post(
            CREATE,
            json=body(name=f"storm-{i}", cpuCores=1, memorySize=512, diskSize=10, storage="ceph"),
            headers=auth(),
        )
        for i in range(3)
    ]
    assert [a.status_code for a in answers] == [200, 200, 200]
    most = 0
    done = asyncio.ensure_future(settle(temporal, answers))
    while not done.done():
        most = max(most, sum(1 for vm in created_vms(pve) if vm.lock == "clone"))
        await asyncio.sleep(0.05)
    await done
    assert most == 1  # never two clones at once on pve1
    assert len(created_vms(pve)) == 3
    with session(engine) as db:
        assert db.exec(select(CloneSlot)).all() == []
        assert db.exec(select(CloneWaiter)).all() == []
        assert db.exec(select(CloneGrant)).all() == []
    # The runs that waited slept until the run before them handed its slot over: no polling.
    for answer in answers[1:]:
        history = await temporal.get_workflow_handle(answer.json()["data"]["task_id"]).fetch_history()
        signals = [e for e in history.events if e.HasField("workflow_execution_signaled_event_attributes")]
        assert [e.workflow_execution_signaled_event_attributes.signal_name for e in signals] == ["clone_slot_granted"]
        scheduled = [
            e.activity_task_scheduled_event_attributes.activity_type.name
            for e in history.events
            if e.HasField("activity_task_scheduled_event_attributes")
        ]
        assert "acquire_clone_slot" not in scheduled


@pytest.mark.usefixtures("one_clone_per_node", "worker")
@pytest.mark.fakepve(time_scale=1)
async def test_a_vmid_taken_outside_the_service_is_replaced(
    api: httpx.AsyncClient, temporal: Client, pve: Any, engine: Engine
) -> None:
    pve.add_ceph_storage("ceph")
    pve.ceph_slow(2)
    first = await api.post(CREATE, json=body(name="first", storage="ceph", cpuCores=1), headers=auth())
    second = await api.post(CREATE, json=body(name="second", storage="ceph", cpuCores=1), headers=auth())
    assert (first.json()["data"]["vmid"], second.json()["data"]["vmid"]) == ("100", "101")
    # While the second waits for the first's clone slot, someone makes VM 101 by hand.
    outsider = pve.add_vm(101, "made-by-hand", node="pve2")
    await settle(temporal, [first])
    result = await result_of(temporal, second.json()["data"]["task_id"])
    assert result.vmid == 102
    assert pve.vm(101) is outsider and outsider.name == "made-by-hand"
    assert sorted(vm.vmid for vm in created_vms(pve)) == [100, 101, 102]
    state = (await api.get(f"/api/v1/vm/manage/tasks/{result.task_id}", headers=auth(ALICE))).json()["data"]
    assert (state["vmid"], state["result_message"]) == ("102", MSG_CREATED)
    assert reservations(engine, HELD) == []
