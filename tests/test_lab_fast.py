"""LabWorkflow with its CreateFromBoxWorkflow children, against the fake activities of tests/fast_env.py on the
time-skipping test server: retries on another target, a lab that makes only some of its VMs, and cancellations
at the moments that are hard to hit for real (during the admission, while the creations wait for clone slots).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowExecutionStatus, WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ApplicationError, CancelledError

from payloads import LabInput, LabResult
from tests.fast_env import FakeActivities, Hold, TimeSkippingServer, task_failed
from tests.waiting import until, until_async
from workflows import LabWorkflow
from workflows.lab import LAB_INCOMPLETE
from workflows.policies import CLOCK_SLACK, LAB_ADMIT_ATTEMPT


@pytest.fixture(scope="module")
async def server() -> AsyncIterator[TimeSkippingServer]:
    server = await TimeSkippingServer.start()
    yield server
    await server.env.shutdown()


@pytest.fixture
def fakes() -> FakeActivities:
    return FakeActivities()


@pytest.fixture
async def task_queue(server: TimeSkippingServer, fakes: FakeActivities) -> AsyncIterator[str]:
    task_queue = f"lab-{uuid.uuid4().hex[:12]}"
    async with server.worker(task_queue, fakes):
        try:
            yield task_queue
        finally:
            fakes.release_holds()
    if not await server.skips_time():
        await server.restart()
        pytest.fail("a run was left open or an activity outlived its run: the test server stopped skipping time")


async def start(
    server: TimeSkippingServer, task_queue: str, task_timeout: timedelta | None = None, **changes: Any
) -> WorkflowHandle[Any, LabResult]:
    fields: dict[str, Any] = {
        "username": "alice",
        "box_id": "60d5ec49f1b2c8a1e4d3b2a1",
        "name": "class",
        "count": 3,
        "cpu_cores": 1,
        "memory_mb": 512,
        "disk_gb": 10,
        "targets": ["pve1", "pve2"],
    }
    return await server.env.client.start_workflow(
        LabWorkflow.run,
        LabInput(**(fields | changes)),
        id=f"lab-{uuid.uuid4().hex[:12]}",
        task_queue=task_queue,
        task_timeout=task_timeout,
    )


async def children_started_and_seen(handle: WorkflowHandle[Any, Any]) -> int:
    """How many child runs the lab's history shows started, once a workflow task of the lab has completed after
    the last of them (0 before)."""
    kinds = [event.event_type for event in (await handle.fetch_history()).events]
    started = [i for i, kind in enumerate(kinds) if kind == EventType.EVENT_TYPE_CHILD_WORKFLOW_EXECUTION_STARTED]
    seen = started and EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED in kinds[started[-1] :]
    return len(started) if seen else 0


async def memo_vms(handle: WorkflowHandle[Any, Any]) -> list[dict[str, Any]]:
    memo = await (await handle.describe()).memo()
    return [memo[key] for key in sorted(memo) if key.startswith("vm")]


async def test_a_lab_makes_each_vm_as_a_child(
    server: TimeSkippingServer, task_queue: str, fakes: FakeActivities
) -> None:
    handle = await start(server, task_queue)
    result = await handle.result()
    assert result.made == 3
    assert [(vm.vm_name, vm.node, vm.status) for vm in result.vms] == [
        ("class-01", "pve1", "succeeded"),
        ("class-02", "pve2", "succeeded"),
        ("class-03", "pve1", "succeeded"),
    ]
    assert fakes.names().count("commit_creation") == 3
    # Each child got its own task id, and its node.
    assert sorted(a["task_id"] for a in fakes.args("admit")) == [f"{handle.id}-0{n}" for n in (1, 2, 3)]
    state = (await (await handle.describe()).memo())["state"]
    assert (state["kind"], state["step"], state["result_code"], state["result_message"]) == (
        "lab",
        "done",
        200,
        "Created 3 of 3 VMs",
    )
    assert [vm["status"] for vm in await memo_vms(handle)] == ["succeeded"] * 3


async def test_a_failed_vm_is_tried_once_more_on_another_target(
    server: TimeSkippingServer, task_queue: str, fakes: FakeActivities
) -> None:
    fakes.script("configure_vm", task_failed("resize: storage 'NFS' is full"))  # the first configuration only
    handle = await start(server, task_queue, count=1)
    result = await handle.result()
    assert result.made == 1
    [vm] = result.vms
    assert (vm.task_id, vm.node, vm.status) == (f"{handle.id}-01-retry", "pve2", "succeeded")
    assert fakes.args("retry_target") == [{"targets": ["pve1", "pve2"], "failed": "pve1", "memory_mb": 512}]
    assert fakes.names().count("destroy_vm") == 1  # the first try cleaned up after itself


async def test_a_lab_that_makes_only_some_vms_fails_and_keeps_them(
    server: TimeSkippingServer, task_queue: str, fakes: FakeActivities
) -> None:
    fakes.script("configure_vm", None, task_failed("a"), task_failed("b"))  # one VM fails twice
    handle = await start(server, task_queue, count=2, targets=["pve2"])
    with pytest.raises(WorkflowFailureError) as caught:
        await handle.result()
    assert isinstance(caught.value.cause, ApplicationError)
    assert (caught.value.cause.type, caught.value.cause.message) == (LAB_INCOMPLETE, "Created 1 of 2 VMs")
    assert sorted(vm["status"] for vm in await memo_vms(handle)) == ["failed", "succeeded"]
    assert fakes.args("retry_target")[0]["failed"] == "pve2"  # one target: tried again there
    assert fakes.names().count("commit_creation") == 1 and fakes.names().count("destroy_vm") == 2


async def test_a_lab_cancelled_during_its_admission_gives_back_what_it_may_hold(
    server: TimeSkippingServer, task_queue: str, fakes: FakeActivities
) -> None:
    admitting = Hold()
    fakes.script("admit_lab", admitting)
    handle = await start(server, task_queue)
    await asyncio.wait_for(admitting.reached.wait(), 10)
    await handle.cancel()
    await asyncio.sleep(1)  # the cancellation is seen when the workflow task of the local activity ends
    admitting.release()
    with pytest.raises(WorkflowFailureError) as caught:
        await handle.result()
    assert isinstance(caught.value.cause, CancelledError)
    # Whatever the admission held, under the creations' task ids, is given back; no creation ran.
    assert fakes.args("release_lab") == [[f"{handle.id}-0{n}" for n in (1, 2, 3)]]
    assert "admit" not in fakes.names()


async def test_a_lab_cancelled_while_its_admission_runs_on_gives_back_once_it_can_write_no_more(
    server: TimeSkippingServer, task_queue: str, fakes: FakeActivities
) -> None:
    admitting = Hold()
    fakes.script("admit_lab", admitting)  # held past the cancellation: the run gives the local activity up
    # The cancellation is seen when the worker ends the workflow task of the local activity, at 80 % of the
    # task timeout: a short one spares seconds of real time.
    handle = await start(server, task_queue, task_timeout=timedelta(seconds=1))
    await asyncio.wait_for(admitting.reached.wait(), 10)

    await handle.cancel()

    with pytest.raises(WorkflowFailureError) as caught:
        await handle.result()
    assert isinstance(caught.value.cause, CancelledError)
    assert fakes.args("release_lab") == [[f"{handle.id}-0{n}" for n in (1, 2, 3)]]
    # The attempt's thread may still write until its own end (activities.db.Deadlines), within
    # LAB_ADMIT_ATTEMPT of the cancellation: the lab gives back what its admission held only after that.
    events = [event async for event in handle.fetch_history_events()]
    kinds = [event.event_type for event in events]
    [timer] = [e.timer_started_event_attributes for e in events if e.event_type == EventType.EVENT_TYPE_TIMER_STARTED]
    assert timer.start_to_fire_timeout.ToTimedelta() == LAB_ADMIT_ATTEMPT + CLOCK_SLACK
    fired = kinds.index(EventType.EVENT_TYPE_TIMER_FIRED)
    assert EventType.EVENT_TYPE_MARKER_RECORDED in kinds[fired:]  # release_lab, after the wait
    admitting.release()


async def test_a_lab_cancelled_while_its_vms_wait_for_clone_slots_cleans_them_up(
    server: TimeSkippingServer, task_queue: str, fakes: FakeActivities
) -> None:
    fakes.always("try_clone_slot", 1)  # every creation waits in line
    handle = await start(server, task_queue)
    await until(lambda: fakes.names().count("try_clone_slot") == 3)
    # ... and the lab has taken in that its three creations started (the time-skipping server has been seen to
    # refuse a lab's workflow task that cancels a child whose start it had not yet taken in).
    await until_async(lambda: children_started_and_seen(handle), 3)
    await handle.cancel()
    with pytest.raises(WorkflowFailureError) as caught:
        await handle.result()
    assert isinstance(caught.value.cause, CancelledError)
    assert (await handle.describe()).status == WorkflowExecutionStatus.CANCELED
    assert [vm["status"] for vm in await memo_vms(handle)] == ["cancelled"] * 3
    # Each creation left the queue and gave its quota back, and none was tried again.
    assert fakes.names().count("release_clone_slot") == 3 and fakes.names().count("release_quota") == 3
    assert "retry_target" not in fakes.names() and "commit_creation" not in fakes.names()
    # Each creation's undo handed its quota over to its retry (quota.undo_creation), which the lab, cancelled,
    # never starts: the lab gives back what every creation of its ids may hold, retries included.
    firsts = [f"{handle.id}-0{n}" for n in (1, 2, 3)]
    assert fakes.args("release_lab") == [[*firsts, *(f"{first}-retry" for first in firsts)]]


async def test_when_no_other_node_can_be_chosen_the_vm_is_tried_again_where_it_failed(
    server: TimeSkippingServer, task_queue: str, fakes: FakeActivities
) -> None:
    fakes.script("configure_vm", task_failed("resize: storage 'NFS' is full"))
    fakes.script("retry_target", ApplicationError("PVE 500: cluster/resources", non_retryable=True))
    handle = await start(server, task_queue, count=1)
    result = await handle.result()
    [vm] = result.vms
    assert (vm.task_id, vm.node, vm.status) == (f"{handle.id}-01-retry", "pve1", "succeeded")
