"""CreateFromBoxWorkflow alone, against fake activities on the time-skipping test server: the branches that
need a PVE or a database in a state that is hard to make for real (a VMID taken under the service's feet, a
lock held by another PVE task, a lost hand-over signal, a deadline passed, a cancellation at a given moment).
Timers and retry back-offs are skipped, so minutes of workflow time take a fraction of a second.

Each test checks the end (result or failure), the activities called in order, and the compensation.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowExecutionStatus, WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ApplicationError, CancelledError
from temporalio.testing import WorkflowEnvironment

from payloads import (
    MSG_BOX_NOT_FOUND,
    MSG_CLONE_FAILED,
    MSG_CONFIGURE_FAILED,
    MSG_CREATED,
    MSG_FORBIDDEN,
    MSG_TOTAL_LIMIT,
    MSG_UNAVAILABLE,
    Admitted,
    BoxOptions,
    CloneStarted,
    CreateFromBoxInput,
    CreateFromBoxResult,
    Failure,
    Step,
)
from tests.fast_env import (
    ADDRESS,
    ADMITTED_VMID,
    CLONE_UPID,
    FACTS,
    TEMPLATE,
    FakeActivities,
    Hold,
    TimeSkippingServer,
    lock_timeout,
    request,
    task_failed,
    vm_not_ours,
    vmid_taken,
)
from tests.waiting import until, until_async
from workflows import CreateFromBoxWorkflow
from workflows.policies import ADMIT_ATTEMPT, CLOCK_SLACK, CLONE_STARTS, PVE_BUDGET, SLOT_RECHECK, VMID_CHANGES

CLONED = ["admit", "try_clone_slot", "start_clone", "await_task", "release_clone_slot"]
CREATED = [*CLONED, "configure_vm", "commit_creation"]
UNDONE = ["destroy_vm", "release_quota"]


@pytest.fixture(scope="module")
async def server() -> AsyncIterator[TimeSkippingServer]:
    server = await TimeSkippingServer.start()
    yield server
    await server.env.shutdown()


@dataclass
class Runs:
    env: WorkflowEnvironment
    task_queue: str

    async def start(
        self, task_timeout: timedelta | None = None, **changes: Any
    ) -> WorkflowHandle[Any, CreateFromBoxResult]:
        """A run started directly (as a parent workflow would): its own code admits the request."""
        return await self.env.client.start_workflow(
            CreateFromBoxWorkflow.run,
            request(**changes),
            id=f"fast-{uuid.uuid4().hex[:12]}",
            task_queue=self.task_queue,
            task_timeout=task_timeout,
        )

    async def now(self) -> datetime:
        """The test server's clock, which workflow.now() reads."""
        return await self.env.get_current_time()


@pytest.fixture
def fakes() -> FakeActivities:
    return FakeActivities()


@pytest.fixture
async def runs(server: TimeSkippingServer, fakes: FakeActivities) -> AsyncIterator[Runs]:
    task_queue = f"fast-{uuid.uuid4().hex[:12]}"
    async with server.worker(task_queue, fakes):
        try:
            yield Runs(server.env, task_queue)
        finally:
            fakes.release_holds()
    if not await server.skips_time():
        await server.restart()
        pytest.fail("a run was left open or an activity outlived its run: the test server stopped skipping time")


# ------------------------------------------------------------------------------- what tests look at


async def failure_of(handle: WorkflowHandle[Any, Any]) -> ApplicationError:
    with pytest.raises(WorkflowFailureError) as caught:
        await handle.result()
    assert isinstance(caught.value.cause, ApplicationError)
    return caught.value.cause


async def assert_cancelled(handle: WorkflowHandle[Any, Any]) -> None:
    with pytest.raises(WorkflowFailureError) as caught:
        await handle.result()
    assert isinstance(caught.value.cause, CancelledError)
    assert (await handle.describe()).status == WorkflowExecutionStatus.CANCELED


async def end_state(handle: WorkflowHandle[Any, Any]) -> dict[str, Any]:
    """The task state the REST API shows, from the run's memo."""
    state: dict[str, Any] = (await (await handle.describe()).memo())["state"]
    return state


def assert_undone(fakes: FakeActivities, task_id: str, vmid: int, failed: bool) -> None:
    """The saga's undo ran last, once each, in reverse order of the doing: the VM, then the quota, which a run that
    failed (not cancelled) may hand over to a lab's retry (quota.undo_creation)."""
    assert fakes.names()[-2:] == UNDONE
    assert [(ref["task_id"], ref["vmid"]) for ref in fakes.args("destroy_vm")] == [(task_id, vmid)]
    assert fakes.args("release_quota") == [task_id]
    assert fakes.undone_as_failed == [failed]


async def run_time(handle: WorkflowHandle[Any, Any]) -> timedelta:
    """How much time the run took by its own clock (the test server's clock also moves between runs)."""
    events = (await handle.fetch_history()).events
    return events[-1].event_time.ToDatetime() - events[0].event_time.ToDatetime()


async def cancel_seen(handle: WorkflowHandle[Any, Any]) -> bool:
    """The run's code has seen its cancellation: a workflow task completed after the request."""
    types = [event.event_type async for event in handle.fetch_history_events()]
    if EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED not in types:
        return False  # not written yet: a workflow task under way (a local activity's) holds it back
    asked = types.index(EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED)
    return EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED in types[asked:]


ACTIVITY_ENDS = {
    EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED: "activity_task_completed_event_attributes",
    EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED: "activity_task_failed_event_attributes",
    EventType.EVENT_TYPE_ACTIVITY_TASK_CANCELED: "activity_task_canceled_event_attributes",
    EventType.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT: "activity_task_timed_out_event_attributes",
}


async def last_call_ended(handle: WorkflowHandle[Any, Any], activity: str) -> bool:
    """The server has the end of the run's last call of `activity`."""
    events = [event async for event in handle.fetch_history_events()]
    scheduled = [
        event.event_id
        for event in events
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
        and event.activity_task_scheduled_event_attributes.activity_type.name == activity
    ]
    ended = {
        getattr(e, ACTIVITY_ENDS[e.event_type]).scheduled_event_id for e in events if e.event_type in ACTIVITY_ENDS
    }
    return scheduled[-1] in ended


async def waits_before_giving_back(handle: WorkflowHandle[Any, Any]) -> list[timedelta]:
    """The timers the run waited on before the local activities that gave back what admission held (each
    timer fired, and both give-backs recorded after it)."""
    events = [event async for event in handle.fetch_history_events()]
    kinds = [event.event_type for event in events]
    waits = []
    for at, event in enumerate(events):
        if event.event_type == EventType.EVENT_TYPE_TIMER_STARTED:
            after = kinds[at:]
            assert EventType.EVENT_TYPE_TIMER_FIRED in after
            fired = after.index(EventType.EVENT_TYPE_TIMER_FIRED)
            assert after[fired:].count(EventType.EVENT_TYPE_MARKER_RECORDED) >= 2  # release_quota, release_clone_slot
            waits.append(event.timer_started_event_attributes.start_to_fire_timeout.ToTimedelta())
    return waits


async def cancel_while_held(handle: WorkflowHandle[Any, Any], fakes: FakeActivities, held: Hold) -> None:
    """Cancel the run while the activity `held` holds is under way, and let that activity end before the run
    does. The test server skips no time while an activity runs, and forgets to start again for one that ends
    after its run has closed: every later test of the module would then wait in real time."""
    cleanup = Hold()
    fakes.script("destroy_vm", cleanup)
    await handle.cancel()
    await asyncio.wait_for(cleanup.reached.wait(), 10)  # the run has given the activity up and cleans up
    held.release()
    await until_async(lambda: last_call_ended(handle, held.activity), True, timeout=10)
    cleanup.release()


async def cancelled_during(runs: Runs, fakes: FakeActivities, activity: str) -> WorkflowHandle[Any, Any]:
    """Start a run and cancel it while activity `activity` (its next call) is under way (see cancel_while_held)."""
    held = Hold()
    fakes.script(activity, held)
    handle = await runs.start()
    await asyncio.wait_for(held.reached.wait(), 10)
    await cancel_while_held(handle, fakes, held)
    return handle


# ------------------------------------------------------------------------------------- the way through


async def test_a_request_is_admitted_cloned_configured_and_recorded(runs: Runs, fakes: FakeActivities) -> None:
    handle = await runs.start()

    result = await handle.result()

    assert result == CreateFromBoxResult(vmid=ADMITTED_VMID, vm_name="web-01", node="pve2", task_id=handle.id)
    assert fakes.names() == CREATED
    [slot] = fakes.args("try_clone_slot")
    assert (slot["task_id"], slot["node"], slot["storage"]) == (handle.id, "pve1", "NFS")  # the template's node
    [clone] = fakes.args("start_clone")
    assert (clone["task_id"], clone["vmid"], clone["target"], clone["storage"]) == (
        handle.id,
        ADMITTED_VMID,
        "pve2",
        "NFS",
    )
    assert fakes.args("await_task") == [{"upid": CLONE_UPID}]
    [config] = fakes.args("configure_vm")
    assert config | {"task_id": handle.id} == {
        "task_id": handle.id,
        "node": "pve2",
        "vmid": ADMITTED_VMID,
        "cpu_cores": 2,
        "memory_mb": 2048,
        "disk_key": "scsi0",
        "disk_gb": 20,
        "template_disk_gb": 10,
        # A box without options: nothing more to write, the drive's storage the clone's.
        "box": dataclasses.asdict(BoxOptions()),
        "ssh_keys": [],
        "storage": "NFS",
        "record": None,  # recorded by a step of its own in a run admitted before the steps were merged
    }
    [record] = fakes.args("commit_creation")
    assert (record["username"], record["vmid"], record["node"], record["name"]) == (
        "alice",
        ADMITTED_VMID,
        "pve2",
        "web-01",
    )
    state = await end_state(handle)
    assert (state["step"], state["vmid"], state["result_code"], state["result_message"]) == (
        Step.DONE,
        ADMITTED_VMID,
        200,
        MSG_CREATED,
    )
    assert dataclasses.asdict(await handle.query(CreateFromBoxWorkflow.state)) == state


async def test_a_clone_already_finished_when_started_is_not_watched(runs: Runs, fakes: FakeActivities) -> None:
    fakes.script("start_clone", CloneStarted(upid=CLONE_UPID, finished=True))
    handle = await runs.start()

    assert (await handle.result()).vmid == ADMITTED_VMID
    assert "await_task" not in fakes.names()


async def test_a_clone_adopted_without_its_task_is_watched_by_its_lock(runs: Runs, fakes: FakeActivities) -> None:
    fakes.script("start_clone", CloneStarted(upid=None))
    handle = await runs.start()

    assert (await handle.result()).vmid == ADMITTED_VMID
    assert fakes.names() == [
        *["admit", "try_clone_slot", "start_clone", "await_clone_by_lock", "release_clone_slot"],
        *["configure_vm", "commit_creation"],
    ]
    [ref] = fakes.args("await_clone_by_lock")
    assert (ref["task_id"], ref["node"], ref["vmid"]) == (handle.id, "pve2", ADMITTED_VMID)


# ---------------------------------------------------------------------------------------- admission


@pytest.mark.parametrize(
    ("failure", "message", "status"),
    [
        (Failure.BOX_NOT_FOUND, MSG_BOX_NOT_FOUND, 404),
        (Failure.FORBIDDEN, MSG_FORBIDDEN, 403),
        (Failure.TOTAL_LIMIT, MSG_TOTAL_LIMIT, 400),
    ],
)
async def test_a_refused_admission_fails_with_its_message_and_gives_back_what_it_held(
    runs: Runs, fakes: FakeActivities, failure: Failure, message: str, status: int
) -> None:
    fakes.script("admit", ApplicationError(message, type=failure.value, non_retryable=True))
    handle = await runs.start()

    error = await failure_of(handle)

    assert (error.type, error.message) == (failure.value, message)
    assert fakes.names() == ["admit", "release_quota"]
    assert fakes.args("release_quota") == [handle.id] and fakes.undone_as_failed == [True]
    state = await end_state(handle)
    assert (state["step"], state["result_code"], state["result_message"]) == (Step.DONE, status, message)


async def test_a_run_past_its_admission_deadline_answers_unavailable_and_creates_nothing(
    runs: Runs, fakes: FakeActivities
) -> None:
    handle = await runs.start(admit_by=await runs.now() - timedelta(seconds=1))

    error = await failure_of(handle)

    assert (error.type, error.message) == (Failure.UNAVAILABLE.value, MSG_UNAVAILABLE)
    assert "start_clone" not in fakes.names()
    assert fakes.names() == ["release_quota"]  # nothing was admitted: only what admission may hold is freed
    state = await end_state(handle)
    assert (state["result_code"], state["result_message"]) == (503, MSG_UNAVAILABLE)


# -------------------------------------------------------------------------- a VMID taken outside the service


async def test_a_vmid_taken_outside_the_service_is_replaced_and_the_vm_gets_the_new_one(
    runs: Runs, fakes: FakeActivities
) -> None:
    fakes.script("start_clone", vmid_taken(), vmid_taken())
    handle = await runs.start()

    result = await handle.result()

    assert result.vmid == ADMITTED_VMID + 2
    reassign = ["start_clone", "inspect_template", "reassign_vmid"]
    assert fakes.names() == ["admit", "try_clone_slot", *reassign, *reassign, *CREATED[2:]]
    assert [clone["vmid"] for clone in fakes.args("start_clone")] == [101, 102, 103]
    assert [asked["task_id"] for asked in fakes.args("reassign_vmid")] == [handle.id, handle.id]
    assert [config["vmid"] for config in fakes.args("configure_vm")] == [103]
    assert [record["vmid"] for record in fakes.args("commit_creation")] == [103]
    assert (await end_state(handle))["vmid"] == 103


async def test_a_vmid_taken_more_often_than_allowed_fails_the_clone_and_cleans_up(
    runs: Runs, fakes: FakeActivities
) -> None:
    fakes.always("start_clone", vmid_taken())
    handle = await runs.start()

    error = await failure_of(handle)

    assert (error.type, error.message) == (Failure.CLONE_FAILED.value, MSG_CLONE_FAILED)
    assert fakes.names().count("start_clone") == VMID_CHANGES + 1
    assert fakes.names().count("reassign_vmid") == VMID_CHANGES
    assert fakes.names()[-4:] == ["start_clone", "release_clone_slot", *UNDONE]
    assert_undone(fakes, handle.id, ADMITTED_VMID + VMID_CHANGES, failed=True)  # the VMID the task holds last
    state = await end_state(handle)
    assert (state["step"], state["result_code"], state["result_message"]) == (Step.DONE, 500, MSG_CLONE_FAILED)


# --------------------------------------------------------------------------------- a lock held on PVE


@pytest.mark.parametrize("failing", ["start_clone", "await_task"])
async def test_a_clone_that_failed_on_a_lock_is_started_again(runs: Runs, fakes: FakeActivities, failing: str) -> None:
    fakes.script(failing, lock_timeout())
    handle = await runs.start()

    assert (await handle.result()).vmid == ADMITTED_VMID

    first_start = ["start_clone"] if failing == "start_clone" else ["start_clone", "await_task"]
    assert fakes.names() == ["admit", "try_clone_slot", *first_start, *CREATED[2:]]
    assert [clone["vmid"] for clone in fakes.args("start_clone")] == [ADMITTED_VMID, ADMITTED_VMID]
    assert "destroy_vm" not in fakes.names()


@pytest.mark.parametrize("failing", ["start_clone", "await_task"])
async def test_a_clone_that_keeps_failing_on_a_lock_fails_after_a_few_starts_and_cleans_up(
    runs: Runs, fakes: FakeActivities, failing: str
) -> None:
    fakes.always(failing, lock_timeout())
    handle = await runs.start()

    error = await failure_of(handle)

    assert (error.type, error.message) == (Failure.CLONE_FAILED.value, MSG_CLONE_FAILED)
    assert fakes.names().count("start_clone") == CLONE_STARTS
    assert fakes.names()[-3:] == ["release_clone_slot", *UNDONE]
    assert_undone(fakes, handle.id, ADMITTED_VMID, failed=True)


# ---------------------------------------------------------------------------------------- clone slots


async def test_a_waiting_run_whose_hand_over_was_lost_looks_again_after_the_recheck_interval(
    runs: Runs, fakes: FakeActivities
) -> None:
    fakes.script("try_clone_slot", 1)  # no slot free (first in line); nobody will say when one is
    began = time.monotonic()
    handle = await runs.start()

    assert (await handle.result()).vmid == ADMITTED_VMID

    assert await run_time(handle) >= SLOT_RECHECK
    assert time.monotonic() - began < SLOT_RECHECK.total_seconds() / 10  # skipped, not waited for
    assert fakes.names() == ["admit", "try_clone_slot", *CREATED[1:]]


async def test_a_hand_over_signal_wakes_a_waiting_run_at_once(runs: Runs, fakes: FakeActivities) -> None:
    fakes.script("try_clone_slot", 1)
    handle = await runs.start()
    await until(lambda: "try_clone_slot" in fakes.names())

    await handle.signal(CreateFromBoxWorkflow.clone_slot_granted)

    assert (await handle.result()).vmid == ADMITTED_VMID
    assert await run_time(handle) < SLOT_RECHECK
    assert fakes.names() == ["admit", "try_clone_slot", *CREATED[1:]]


async def test_a_slot_taken_at_admission_is_not_asked_for_again(runs: Runs, fakes: FakeActivities) -> None:
    fakes.script("admit", Admitted(template=TEMPLATE, facts=FACTS, vmid=ADMITTED_VMID, clone_slot=0))
    handle = await runs.start()
    assert (await handle.result()).vmid == ADMITTED_VMID
    assert fakes.names() == ["admit", *CREATED[2:]]  # no try_clone_slot: admission holds the slot


async def test_a_run_admitted_in_line_waits_for_the_hand_over_even_if_it_came_at_once(
    runs: Runs, fakes: FakeActivities
) -> None:
    # Admission queued it (2nd in line); the hand-over's signal may come before the run sleeps: it is not lost.
    admitted = Hold(then=Admitted(template=TEMPLATE, facts=FACTS, vmid=ADMITTED_VMID, clone_slot=2))
    fakes.script("admit", admitted)
    handle = await runs.start()
    await asyncio.wait_for(admitted.reached.wait(), 10)
    await handle.signal(CreateFromBoxWorkflow.clone_slot_granted)
    admitted.release()

    assert (await handle.result()).vmid == ADMITTED_VMID
    assert await run_time(handle) < SLOT_RECHECK
    assert fakes.names() == ["admit", "try_clone_slot", *CREATED[2:]]


# -------------------------------------------------------------------------------------- cancellation


async def test_a_run_cancelled_during_admission_answers_unavailable_and_gives_back_what_it_held(
    runs: Runs, fakes: FakeActivities
) -> None:
    admitting = Hold()
    fakes.script("admit", admitting)
    # A run sees its cancellation only when the workflow task running the local activity ends, which the
    # worker does at 80 % of the task timeout: a short one spares seconds of real time.
    handle = await runs.start(task_timeout=timedelta(seconds=1))
    await asyncio.wait_for(admitting.reached.wait(), 10)

    await handle.cancel()

    await assert_cancelled(handle)
    # A cancellation may come as the admission ends (its answer then never seen): the slot it may hold is freed.
    assert fakes.names() == ["admit", "release_quota", "release_clone_slot"]
    assert fakes.args("release_quota") == [handle.id] and fakes.undone_as_failed == [False]
    state = await end_state(handle)
    assert (state["result_code"], state["result_message"]) == (503, MSG_UNAVAILABLE)
    # The admission's attempt was given up, not ended: its thread may still write until its own end (it
    # began before the cancellation, so it ends within ADMIT_ATTEMPT of it). What the run held is given back
    # only after that, so that it includes whatever that attempt wrote.
    assert await waits_before_giving_back(handle) == [ADMIT_ATTEMPT + CLOCK_SLACK]


async def test_an_admission_refused_by_its_own_answer_gives_back_at_once(runs: Runs, fakes: FakeActivities) -> None:
    fakes.script("admit", ApplicationError(MSG_TOTAL_LIMIT, type=Failure.TOTAL_LIMIT.value, non_retryable=True))
    handle = await runs.start()

    await failure_of(handle)

    assert await waits_before_giving_back(handle) == []  # the activity ended: nothing of it runs on


async def test_a_run_cancelled_while_waiting_for_a_clone_slot_leaves_the_queue_and_gives_back_its_quota(
    runs: Runs, fakes: FakeActivities
) -> None:
    fakes.always("try_clone_slot", 1)
    handle = await runs.start()
    await until(lambda: "try_clone_slot" in fakes.names())

    await handle.cancel()

    await assert_cancelled(handle)
    assert fakes.names() == ["admit", "try_clone_slot", "release_clone_slot", *UNDONE]
    assert fakes.args("release_clone_slot") == [handle.id]
    assert_undone(fakes, handle.id, ADMITTED_VMID, failed=False)


async def test_a_run_cancelled_while_its_clone_request_is_on_its_way_waits_for_the_answer_then_cleans_up(
    runs: Runs, fakes: FakeActivities
) -> None:
    request_on_its_way = Hold(then=CloneStarted(upid=CLONE_UPID))
    fakes.script("start_clone", request_on_its_way)
    handle = await runs.start()
    await asyncio.wait_for(request_on_its_way.reached.wait(), 10)

    await handle.cancel()
    await until_async(lambda: cancel_seen(handle), True, timeout=10)
    # A cleanup now could look for the VM before PVE has made it, and leave it behind.
    assert fakes.names() == ["admit", "try_clone_slot", "start_clone"]
    request_on_its_way.release()

    await assert_cancelled(handle)
    assert fakes.names() == ["admit", "try_clone_slot", "start_clone", "release_clone_slot", *UNDONE]
    assert_undone(fakes, handle.id, ADMITTED_VMID, failed=False)


async def test_a_run_cancelled_while_the_clone_runs_destroys_it_and_gives_back_its_quota(
    runs: Runs, fakes: FakeActivities
) -> None:
    handle = await cancelled_during(runs, fakes, "await_task")

    await assert_cancelled(handle)
    assert fakes.names() == [*CLONED, *UNDONE]
    assert fakes.args("release_clone_slot") == [handle.id]
    assert_undone(fakes, handle.id, ADMITTED_VMID, failed=False)


async def test_a_run_cancelled_during_configuration_destroys_the_vm_and_gives_back_its_quota(
    runs: Runs, fakes: FakeActivities
) -> None:
    handle = await cancelled_during(runs, fakes, "configure_vm")

    await assert_cancelled(handle)
    assert fakes.names() == [*CLONED, "configure_vm", *UNDONE]
    assert_undone(fakes, handle.id, ADMITTED_VMID, failed=False)


async def test_a_run_cancelled_while_its_vm_is_recorded_keeps_the_vm(runs: Runs, fakes: FakeActivities) -> None:
    # The record is the last step: once it is under way the VM is the owner's (a lab cancelled as its VMs are
    # made keeps those made). Undoing it then would destroy a VM that the database still counts.
    recording = Hold()
    fakes.script("commit_creation", recording)
    handle = await runs.start(task_timeout=timedelta(seconds=1))  # see the admission's cancel test above
    await asyncio.wait_for(recording.reached.wait(), 10)

    await handle.cancel()
    await until_async(lambda: cancel_seen(handle), True, timeout=10)
    recording.release()

    result = await handle.result()
    assert result.vmid == ADMITTED_VMID
    assert fakes.names() == [*CLONED, "configure_vm", "commit_creation"]  # nothing destroyed, nothing given back
    assert (await handle.describe()).status == WorkflowExecutionStatus.COMPLETED


# ------------------------------------------------------------------------------------- configuration


async def test_a_configuration_that_fails_destroys_the_vm_and_gives_back_its_quota(
    runs: Runs, fakes: FakeActivities
) -> None:
    fakes.script("configure_vm", task_failed("resize: storage 'NFS' is full"))
    handle = await runs.start()

    error = await failure_of(handle)

    assert (error.type, error.message) == (Failure.CONFIGURE_FAILED.value, MSG_CONFIGURE_FAILED)
    assert fakes.names() == [*CLONED, "configure_vm", *UNDONE]
    assert_undone(fakes, handle.id, ADMITTED_VMID, failed=True)
    state = await end_state(handle)
    assert (state["step"], state["result_code"], state["result_message"]) == (Step.DONE, 500, MSG_CONFIGURE_FAILED)


async def test_a_vm_that_is_no_longer_the_tasks_fails_the_configuration_at_once_and_is_left_to_its_owner(
    runs: Runs, fakes: FakeActivities
) -> None:
    fakes.script("configure_vm", vm_not_ours())
    handle = await runs.start()

    error = await failure_of(handle)

    assert (error.type, error.message) == (Failure.CONFIGURE_FAILED.value, MSG_CONFIGURE_FAILED)
    assert "is not task" in str(error.details[0])  # the reason, for operators
    # Not retried, never recorded; the cleanup is asked for the task's own VM, which destroy_vm checks the marker
    # of (another run's VM under the VMID is left alone), and the quota comes back.
    assert fakes.names() == [*CLONED, "configure_vm", *UNDONE]
    assert_undone(fakes, handle.id, ADMITTED_VMID, failed=True)
    state = await end_state(handle)
    assert (state["step"], state["result_code"], state["result_message"]) == (Step.DONE, 500, MSG_CONFIGURE_FAILED)


async def test_a_configuration_error_that_outlasts_the_retry_budget_fails_the_run_and_cleans_up(
    runs: Runs, fakes: FakeActivities
) -> None:
    fakes.always("configure_vm", ConnectionResetError("Connection reset by peer"))  # transient: retried
    handle = await runs.start()

    error = await failure_of(handle)

    assert error.message == MSG_CONFIGURE_FAILED
    assert fakes.names().count("configure_vm") > 5
    assert await run_time(handle) >= PVE_BUDGET / 2  # retried with back-off for most of the budget
    assert_undone(fakes, handle.id, ADMITTED_VMID, failed=True)


# ------------------------------------------------------------------------------------- a VM ready to use

STARTED = [*CLONED, "configure_vm", "start_vm", "vm_addresses", "commit_creation"]


def admitted_with(**options: Any) -> Admitted:
    return Admitted(template=TEMPLATE, facts=FACTS, vmid=ADMITTED_VMID, box=BoxOptions(**options))


async def test_a_box_that_starts_its_vms_starts_it_after_configuring_and_records_its_address(
    runs: Runs, fakes: FakeActivities
) -> None:
    fakes.script("admit", admitted_with(start=True, wait_for_ip_seconds=120))
    handle = await runs.start()

    await handle.result()

    assert fakes.names() == STARTED
    [watch] = fakes.args("vm_addresses")
    assert (watch["vm"]["vmid"], watch["seconds"]) == (ADMITTED_VMID, 120)
    [record] = fakes.args("commit_creation")
    assert record["ip_addresses"] == [ADDRESS]
    state = await end_state(handle)
    assert (state["step"], state["result_code"], state["ip_addresses"]) == (Step.DONE, 200, [ADDRESS])


@pytest.mark.parametrize(
    ("box_starts", "asked", "calls"),
    [
        (True, False, CREATED),  # the request's start overrides the box's
        (False, True, [*CLONED, "configure_vm", "start_vm", "commit_creation"]),  # no wait for an address
    ],
)
async def test_the_requests_start_overrides_the_boxs(
    runs: Runs, fakes: FakeActivities, box_starts: bool, asked: bool, calls: list[str]
) -> None:
    fakes.script("admit", admitted_with(start=box_starts, wait_for_ip_seconds=0))
    handle = await runs.start(start=asked)

    await handle.result()

    assert fakes.names() == calls
    assert (await end_state(handle))["ip_addresses"] == []


async def test_an_address_that_does_not_come_is_no_failure(runs: Runs, fakes: FakeActivities) -> None:
    fakes.script("admit", admitted_with(start=True, wait_for_ip_seconds=30))
    fakes.script("vm_addresses", vm_not_ours())  # whatever ends the wait, the VM is made
    handle = await runs.start()

    result = await handle.result()

    assert result.vmid == ADMITTED_VMID
    assert fakes.names() == STARTED
    assert (await end_state(handle))["ip_addresses"] == []


async def test_a_start_that_fails_is_a_configuration_failure_and_cleans_up(runs: Runs, fakes: FakeActivities) -> None:
    fakes.script("admit", admitted_with(start=True, wait_for_ip_seconds=30))
    fakes.script("start_vm", task_failed("start failed: QEMU exited with code 1"))
    handle = await runs.start()

    error = await failure_of(handle)

    assert (error.type, error.message) == (Failure.CONFIGURE_FAILED.value, MSG_CONFIGURE_FAILED)
    assert fakes.names() == [*CLONED, "configure_vm", "start_vm", *UNDONE]
    assert_undone(fakes, handle.id, ADMITTED_VMID, failed=True)
    state = await end_state(handle)
    assert (state["step"], state["result_code"], state["result_message"]) == (Step.DONE, 500, MSG_CONFIGURE_FAILED)


# ------------------------------------------------------------------------------------- merged steps
# Runs admitted with `steps_merged` (this version's admission) ask the clone's activity to free the clone slot
# (CloneInput.free_slot), and the configuration's to record the VM when nothing follows it (ConfigureInput.record):
# activities/creation.py. The tests above run the path of runs admitted before (`steps_merged` unset), which
# stays for those still in flight across an upgrade.

MERGED = Admitted(
    template=TEMPLATE, facts=FACTS, vmid=ADMITTED_VMID, clone_slot=0, changes_only=True, steps_merged=True
)
CLONED_AND_FREED = CloneStarted(upid=CLONE_UPID, finished=True, slot_freed=True)


async def test_a_merged_creation_is_one_local_and_two_remote_activities(runs: Runs, fakes: FakeActivities) -> None:
    fakes.script("admit", MERGED)
    fakes.script("start_clone", CLONED_AND_FREED)
    handle = await runs.start()

    assert (await handle.result()).vmid == ADMITTED_VMID
    assert fakes.names() == ["admit", "start_clone", "configure_vm"]  # the slot came with admission
    [clone] = fakes.args("start_clone")
    assert clone["free_slot"] is True
    [config] = fakes.args("configure_vm")
    assert (config["vmid"], config["cpu_cores"]) == (ADMITTED_VMID, 2)
    record = config["record"]
    assert (record["task_id"], record["vmid"], record["username"]) == (handle.id, ADMITTED_VMID, "alice")
    assert (await end_state(handle))["result_code"] == 200


@pytest.mark.parametrize(
    "started",
    [
        CloneStarted(upid=CLONE_UPID),
        CloneStarted(upid=CLONE_UPID, finished=True, slot_freed=False),
        CloneStarted(upid=CLONE_UPID, finished=True),
    ],
    ids=["clone-outlasted-the-activity", "free-failed", "older-worker"],
)
async def test_a_slot_the_clones_activity_did_not_free_is_freed_by_the_run(
    runs: Runs, fakes: FakeActivities, started: CloneStarted
) -> None:
    fakes.script("admit", MERGED)
    fakes.script("start_clone", started)
    handle = await runs.start()

    assert (await handle.result()).vmid == ADMITTED_VMID
    watched = ["await_task"] if not started.finished else []
    assert fakes.names() == ["admit", "start_clone", *watched, "release_clone_slot", "configure_vm"]
    assert fakes.args("release_clone_slot") == [handle.id]


async def test_a_vm_an_older_worker_configured_without_recording_it_is_recorded_by_the_run(
    runs: Runs, fakes: FakeActivities
) -> None:
    # A worker of the version before ignores ConfigureInput.record and answers None: the run records the VM.
    fakes.script("admit", MERGED)
    fakes.script("start_clone", CLONED_AND_FREED)
    fakes.script("configure_vm", None)
    handle = await runs.start()

    assert (await handle.result()).vmid == ADMITTED_VMID
    assert fakes.names() == ["admit", "start_clone", "configure_vm", "commit_creation"]
    assert fakes.args("commit_creation")[0]["task_id"] == handle.id


async def test_a_merged_configuration_that_fails_is_undone(runs: Runs, fakes: FakeActivities) -> None:
    fakes.script("admit", MERGED)
    fakes.script("start_clone", CLONED_AND_FREED)
    fakes.script("configure_vm", task_failed("resize: storage 'NFS' is full"))
    handle = await runs.start()

    assert (await failure_of(handle)).message == MSG_CONFIGURE_FAILED
    # Freed by the clone: not again. (The undo takes back the record too if the activity had written it:
    # quota.undo_creation, test_quota.py.)
    assert fakes.names() == ["admit", "start_clone", "configure_vm", *UNDONE]
    assert_undone(fakes, handle.id, ADMITTED_VMID, failed=True)


async def test_a_run_cancelled_during_its_merged_configuration_is_undone(runs: Runs, fakes: FakeActivities) -> None:
    # Unlike the record's own step, the merged one is cancellable: the run undoes the creation at once, and the
    # activity records nothing after that undo (quota.commit's `unless_given_back`, tested in test_quota.py).
    fakes.script("admit", MERGED)
    fakes.script("start_clone", CLONED_AND_FREED)
    handle = await cancelled_during(runs, fakes, "configure_vm")

    await assert_cancelled(handle)
    assert fakes.names() == ["admit", "start_clone", "configure_vm", *UNDONE]
    assert_undone(fakes, handle.id, ADMITTED_VMID, failed=False)


async def test_a_merged_creation_that_starts_its_vm_records_it_after_the_start(
    runs: Runs, fakes: FakeActivities
) -> None:
    # The record carries the guest's address, which only comes after the start: it stays a step of its own.
    fakes.script("admit", dataclasses.replace(MERGED, box=BoxOptions(start=True, wait_for_ip_seconds=30)))
    fakes.script("start_clone", CLONED_AND_FREED)
    handle = await runs.start()

    assert (await handle.result()).vmid == ADMITTED_VMID
    assert fakes.names() == ["admit", "start_clone", "configure_vm", "start_vm", "vm_addresses", "commit_creation"]
    assert fakes.args("configure_vm")[0]["record"] is None
    [record] = fakes.args("commit_creation")
    assert record["ip_addresses"] == [ADDRESS]


# ------------------------------------------------------------------------- configured with the clone

WITH_CLONE = dataclasses.replace(MERGED, configure_with_clone=True)
CONFIGURED = CloneStarted(upid=CLONE_UPID, finished=True, slot_freed=True, configured=True)


async def box_steps(handle: WorkflowHandle[Any, Any]) -> list[str]:
    """Every BoxStep the run published, in order (decoded from its history)."""
    steps = []
    async for event in handle.fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES:
            fields = event.upsert_workflow_search_attributes_event_attributes.search_attributes.indexed_fields
            if "BoxStep" in fields:
                steps.append(json.loads(fields["BoxStep"].data))
    return steps


async def test_a_vm_configured_by_the_clones_activity_is_recorded_by_the_run(runs: Runs, fakes: FakeActivities) -> None:
    fakes.script("admit", WITH_CLONE)
    fakes.script("start_clone", CONFIGURED)
    handle = await runs.start()

    assert (await handle.result()).vmid == ADMITTED_VMID
    assert fakes.names() == ["admit", "start_clone", "commit_creation"]  # one activity, and the record
    [clone] = fakes.args("start_clone")
    configure = clone["configure"]
    assert (configure["vmid"], configure["cpu_cores"], configure["memory_mb"]) == (ADMITTED_VMID, 2, 2048)
    assert configure["record"] is None  # never with the clone: see the cancellation test below
    [record] = fakes.args("commit_creation")
    assert (record["task_id"], record["vmid"], record["username"]) == (handle.id, ADMITTED_VMID, "alice")
    # The configuration was no step of the run's own: BoxStep went from the clone to the end.
    assert await box_steps(handle) == ["admission", "clone", "done"]
    assert (await end_state(handle))["result_code"] == 200


async def test_a_configuration_the_clones_activity_did_not_do_is_the_runs_own_step(
    runs: Runs, fakes: FakeActivities
) -> None:
    # Not configured (a lock, a dropped connection, or a worker of the version before): the run's own step
    # configures and records, as for runs admitted before.
    fakes.script("admit", WITH_CLONE)
    fakes.script("start_clone", CloneStarted(upid=CLONE_UPID, finished=True, slot_freed=True))
    handle = await runs.start()

    assert (await handle.result()).vmid == ADMITTED_VMID
    assert fakes.names() == ["admit", "start_clone", "configure_vm"]
    assert fakes.args("configure_vm")[0]["record"]["vmid"] == ADMITTED_VMID
    assert await box_steps(handle) == ["admission", "clone", "configure", "done"]


async def test_a_final_error_met_by_the_clones_activity_fails_the_configuration_at_once(
    runs: Runs, fakes: FakeActivities
) -> None:
    fakes.script("admit", WITH_CLONE)
    reason = "ConfigureFailed: Parameter verification failed."  # as str() of the activity's ApplicationError
    fakes.script("start_clone", dataclasses.replace(CONFIGURED, configured=False, configure_failure=reason))
    handle = await runs.start()

    failure = await failure_of(handle)
    assert (failure.message, failure.details) == (MSG_CONFIGURE_FAILED, (reason,))
    assert fakes.names() == ["admit", "start_clone", *UNDONE]  # PVE is not asked again
    assert_undone(fakes, handle.id, ADMITTED_VMID, failed=True)
    assert (await end_state(handle))["result_message"] == MSG_CONFIGURE_FAILED


async def test_a_run_cancelled_while_the_clones_activity_configures_undoes_the_creation(
    runs: Runs, fakes: FakeActivities
) -> None:
    # The activity ends (a clone request may be on its way), then the run undoes it all: the VM was configured
    # but never recorded, so nothing of it stays.
    fakes.script("admit", WITH_CLONE)
    configuring = Hold(then=CONFIGURED)
    fakes.script("start_clone", configuring)
    handle = await runs.start()
    await asyncio.wait_for(configuring.reached.wait(), 10)

    await handle.cancel()
    await until_async(lambda: cancel_seen(handle), True, timeout=10)
    assert fakes.names() == ["admit", "start_clone"]
    configuring.release()

    await assert_cancelled(handle)
    assert fakes.names() == ["admit", "start_clone", "release_clone_slot", *UNDONE]
    assert_undone(fakes, handle.id, ADMITTED_VMID, failed=False)


async def test_a_vm_configured_with_the_clone_and_started_is_recorded_after_the_start(
    runs: Runs, fakes: FakeActivities
) -> None:
    fakes.script("admit", dataclasses.replace(WITH_CLONE, box=BoxOptions(start=True, wait_for_ip_seconds=30)))
    fakes.script("start_clone", CONFIGURED)
    handle = await runs.start()

    assert (await handle.result()).vmid == ADMITTED_VMID
    assert fakes.names() == ["admit", "start_clone", "start_vm", "vm_addresses", "commit_creation"]
    assert fakes.args("commit_creation")[0]["ip_addresses"] == [ADDRESS]
    assert await box_steps(handle) == ["admission", "clone", "start", "done"]


async def test_a_vmid_replaced_before_the_clone_is_the_one_configured(runs: Runs, fakes: FakeActivities) -> None:
    fakes.script("admit", WITH_CLONE)
    fakes.script("start_clone", vmid_taken(), CONFIGURED)
    handle = await runs.start()

    result = await handle.result()
    assert result.vmid == ADMITTED_VMID + 1
    clones = fakes.args("start_clone")
    assert [(c["vmid"], c["configure"]["vmid"]) for c in clones] == [(101, 101), (102, 102)]
    assert fakes.args("commit_creation")[0]["vmid"] == 102


def test_the_input_takes_the_contracts_fields_in_the_contracts_order() -> None:
    """A parent workflow may pass them by position: the contract's fields, then ssh_keys and start, come first."""
    ask = CreateFromBoxInput("alice", "box", "web", "pve1", 2, 2048, 20, "NFS", ["ssh-ed25519 AAAA a@b"], True)
    assert (ask.storage, ask.ssh_keys, ask.start, ask.admit_by) == ("NFS", ["ssh-ed25519 AAAA a@b"], True, None)
