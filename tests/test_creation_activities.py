"""activities/creation.py: the clone's activity frees the clone slot and configures the VM once the clone ended
well, when asked, and leaves them to the run otherwise (a final error of the configuration handed to the run);
the configuration's records the VM, when asked, unless the run has undone the creation meanwhile. The PVE and
database halves are stubs here: each half is tested on its own (test_pve_activities.py, test_quota.py), and end
to end by every creation of the suite, which takes these activities."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
from temporalio import workflow
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment
from temporalio.worker import Worker

from activities.creation import CONFIGURE_SECONDS, CreationActivities
from payloads import (
    VM_NOT_OURS,
    CloneInput,
    CloneStarted,
    ConfigureInput,
    Failure,
    FinishInput,
    TemplateRef,
)
from pve.client import PveUnavailable
from workflows.policies import PVE_HEARTBEAT, pve_change

UPID = "UPID:pve1:00001234:00005678:6560A1B2:qmclone:9000:root@pam:"
CLONE = CloneInput("task-1", TemplateRef(node="pve1", vmid=9000), 100, "web-01", "pve2", "NFS", free_slot=True)
CONFIGURE = ConfigureInput("task-1", "pve2", 100, 2, 2048, "scsi0", 20, 10)
RECORD = FinishInput("task-1", "alice", 100, "pve2", "web-01", 2, 2048, 20)
MERGED = dataclasses.replace(CONFIGURE, record=RECORD)


class Halves:
    """PveActivities' and DbActivities' parts that CreationActivities calls, recording the calls."""

    def __init__(
        self,
        started: CloneStarted,
        free_fails: bool = False,
        recorded: bool = True,
        configure_fails: Exception | None = None,
    ) -> None:
        self.started, self.free_fails, self.recorded = started, free_fails, recorded
        self.configure_fails = configure_fails
        self.calls: list[tuple[str, Any]] = []

    def start_clone(self, req: CloneInput) -> CloneStarted:
        self.calls.append(("start_clone", req.vmid))
        return self.started

    async def release_clone_slot(self, task_id: str) -> list[str]:
        self.calls.append(("release_clone_slot", task_id))
        if self.free_fails:
            raise ConnectionError("Temporal is unreachable")
        return []

    def configure_vm(self, req: ConfigureInput) -> None:
        self.calls.append(("configure_vm", req.vmid))
        if self.configure_fails is not None:
            raise self.configure_fails

    def record_unless_given_back(self, done: FinishInput) -> bool:
        self.calls.append(("record", done.task_id))
        return self.recorded


def creation(halves: Halves) -> CreationActivities:
    return CreationActivities(cast(Any, halves), cast(Any, halves), asyncio.get_running_loop())


async def test_a_clone_that_ended_well_frees_its_slot_in_the_same_activity() -> None:
    halves = Halves(CloneStarted(upid=UPID, finished=True))
    started = await asyncio.to_thread(creation(halves).start_clone, CLONE)  # a thread, as the worker runs it
    assert started == CloneStarted(upid=UPID, finished=True, slot_freed=True)
    assert halves.calls == [("start_clone", 100), ("release_clone_slot", "task-1")]


@pytest.mark.parametrize("started", [CloneStarted(upid=UPID), CloneStarted(upid=None)], ids=["running", "adopted"])
async def test_a_clone_still_running_keeps_its_slot(started: CloneStarted) -> None:
    halves = Halves(started)
    assert await asyncio.to_thread(creation(halves).start_clone, CLONE) == started  # the run watches, then frees
    assert halves.calls == [("start_clone", 100)]


async def test_a_free_that_fails_is_left_to_the_run(caplog: pytest.LogCaptureFixture) -> None:
    halves = Halves(CloneStarted(upid=UPID, finished=True), free_fails=True)
    with caplog.at_level(logging.WARNING, logger="activities.creation"):
        started = await asyncio.to_thread(creation(halves).start_clone, CLONE)
    assert started == CloneStarted(upid=UPID, finished=True, slot_freed=False)
    assert "task-1: could not free its clone slot at once; the run frees it" in caplog.text


async def test_a_clone_not_asked_to_free_its_slot_keeps_it() -> None:
    # A run admitted before the steps were merged frees the slot in a local activity of its own.
    halves = Halves(CloneStarted(upid=UPID, finished=True))
    not_asked = dataclasses.replace(CLONE, free_slot=False)
    assert await asyncio.to_thread(creation(halves).start_clone, not_asked) == CloneStarted(upid=UPID, finished=True)
    assert halves.calls == [("start_clone", 100)]


WITH_CONFIGURE = dataclasses.replace(CLONE, configure=CONFIGURE)


def as_activity(left: timedelta = timedelta(minutes=4, seconds=30)) -> ActivityEnvironment:
    """The activity's context, its attempt just started with `left` of its time (the workflow gives the clone's
    activity 90 s + 3 min when it asks for the configuration too)."""
    env = ActivityEnvironment()
    now = datetime.now(UTC)
    env.info = dataclasses.replace(
        env.info, scheduled_time=now, started_time=now, start_to_close_timeout=left, schedule_to_close_timeout=None
    )
    return env


async def clone_configuring(halves: Halves, env: ActivityEnvironment | None = None) -> CloneStarted:
    """start_clone asked to configure, in an activity's context, on a thread as the worker runs it."""
    return await asyncio.to_thread((env or as_activity()).run, creation(halves).start_clone, WITH_CONFIGURE)


async def test_a_clone_that_ended_well_frees_its_slot_then_configures_the_vm_when_asked() -> None:
    halves = Halves(CloneStarted(upid=UPID, finished=True))
    started = await clone_configuring(halves)
    assert started == CloneStarted(upid=UPID, finished=True, slot_freed=True, configured=True)
    assert halves.calls == [("start_clone", 100), ("release_clone_slot", "task-1"), ("configure_vm", 100)]


async def test_a_clone_that_left_too_little_time_leaves_the_configuration_to_the_run() -> None:
    # A clone that took its retries: a configuration cut short by the activity's timeout would fail the clone.
    halves = Halves(CloneStarted(upid=UPID, finished=True))
    started = await clone_configuring(halves, as_activity(left=timedelta(seconds=CONFIGURE_SECONDS - 1)))
    assert started == CloneStarted(upid=UPID, finished=True, slot_freed=True)
    assert halves.calls == [("start_clone", 100), ("release_clone_slot", "task-1")]


@pytest.mark.parametrize("started", [CloneStarted(upid=UPID), CloneStarted(upid=None)], ids=["running", "adopted"])
async def test_a_clone_still_running_is_not_configured(started: CloneStarted) -> None:
    halves = Halves(started)
    assert await clone_configuring(halves) == started
    assert halves.calls == [("start_clone", 100)]


async def test_a_configuration_that_may_succeed_later_is_left_to_the_run(caplog: pytest.LogCaptureFixture) -> None:
    # A lock, a dropped connection: the run's configuration step tries again, with its retry policy.
    halves = Halves(CloneStarted(upid=UPID, finished=True), configure_fails=PveUnavailable("connection reset"))
    with caplog.at_level(logging.WARNING, logger="activities.creation"):
        started = await clone_configuring(halves)
    assert started == CloneStarted(upid=UPID, finished=True, slot_freed=True)
    assert "task-1: could not configure VM 100 with its clone (connection reset); the run does" in caplog.text


@pytest.mark.parametrize(
    "error",
    [
        ApplicationError("Parameter verification failed.", type=Failure.CONFIGURE_FAILED.value, non_retryable=True),
        ApplicationError("VM 100 on node pve2 is not task task-1's", type=VM_NOT_OURS),  # final by its type
    ],
    ids=["pve-400", "not-ours"],
)
async def test_a_final_configuration_error_is_handed_to_the_run(error: ApplicationError) -> None:
    # No retry would change it: the run fails its configuration with it at once, without asking PVE again.
    halves = Halves(CloneStarted(upid=UPID, finished=True), configure_fails=error)
    started = await clone_configuring(halves)
    # As the run's configuration step would have kept it (policies.innermost_reason): type and message.
    assert started == CloneStarted(upid=UPID, finished=True, slot_freed=True, configure_failure=str(error))
    assert started.configure_failure is not None and error.message in started.configure_failure


async def test_the_configuration_records_the_vm_after_configuring_it_when_asked() -> None:
    halves = Halves(CloneStarted(upid=UPID))
    assert await asyncio.to_thread(creation(halves).configure_vm, MERGED) is True
    assert halves.calls == [("configure_vm", 100), ("record", "task-1")]

    halves.calls.clear()  # not asked (a run admitted before): configured only, and the run records it
    assert await asyncio.to_thread(creation(halves).configure_vm, CONFIGURE) is None
    assert halves.calls == [("configure_vm", 100)]


async def test_a_configuration_whose_creation_was_undone_meanwhile_fails_for_good() -> None:
    halves = Halves(CloneStarted(upid=UPID), recorded=False)
    with pytest.raises(ApplicationError) as caught:
        await asyncio.to_thread(creation(halves).configure_vm, MERGED)
    assert (caught.value.type, caught.value.non_retryable) == (Failure.CONFIGURE_FAILED.value, True)


# ---------------------------------------------------------------------- on a real server, as the run asks


@workflow.defn(sandboxed=False)
class CloneOnce:
    @workflow.run
    async def run(self, req: CloneInput) -> CloneStarted:
        return await pve_change(CreationActivities.start_clone, req, timedelta(seconds=90), "clone")


class SlowHandOver(Halves):
    async def release_clone_slot(self, task_id: str) -> list[str]:
        self.calls.append(("release_clone_slot", task_id))
        await asyncio.sleep(PVE_HEARTBEAT.total_seconds() + 2)  # a database or Temporal that is slow to answer
        return []


async def test_a_slow_hand_over_heartbeats_and_keeps_its_attempt(temporal: Client) -> None:
    # Without heartbeats while the slot is handed over, an attempt whose hand-over outlasts the heartbeat
    # timeout would be timed out and its answer thrown away (then retried, the VM adopted, the slot freed again).
    halves = SlowHandOver(CloneStarted(upid=UPID, finished=True))
    queue = f"creation-{uuid.uuid4().hex[:8]}"
    with ThreadPoolExecutor(max_workers=4) as executor:
        activities = CreationActivities(cast(Any, halves), cast(Any, halves), asyncio.get_running_loop())
        async with Worker(
            temporal,
            task_queue=queue,
            workflows=[CloneOnce],
            activities=[activities.start_clone],
            activity_executor=executor,
            max_heartbeat_throttle_interval=timedelta(seconds=2),  # as worker.py
        ):
            run = temporal.execute_workflow(CloneOnce.run, CLONE, id=queue, task_queue=queue)
            started = await asyncio.wait_for(run, 45)  # timed out, the attempts would go on for minutes
    assert started == CloneStarted(upid=UPID, finished=True, slot_freed=True)
    assert halves.calls == [("start_clone", 100), ("release_clone_slot", "task-1")]  # one attempt
