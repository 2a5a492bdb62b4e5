"""activities/creation.py: the clone's activity frees the clone slot once the clone ended well, and leaves it to
the run otherwise; the configuration's records the VM unless the run has undone the creation meanwhile. The PVE
and database halves are stubs here: each half is tested on its own (test_pve_activities.py, test_quota.py), and
end to end by every creation of the suite, which takes these activities."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

import pytest
from temporalio.exceptions import ApplicationError

from activities.creation import CreationActivities
from payloads import (
    CloneInput,
    CloneStarted,
    ConfigureAndRecord,
    ConfigureInput,
    Failure,
    FinishInput,
    TemplateRef,
)

UPID = "UPID:pve1:00001234:00005678:6560A1B2:qmclone:9000:root@pam:"
CLONE = CloneInput("task-1", TemplateRef(node="pve1", vmid=9000), 100, "web-01", "pve2", "NFS")
MERGED = ConfigureAndRecord(
    configure=ConfigureInput("task-1", "pve2", 100, 2, 2048, "scsi0", 20, 10),
    record=FinishInput("task-1", "alice", 100, "pve2", "web-01", 2, 2048, 20),
)


class Halves:
    """PveActivities' and DbActivities' parts that CreationActivities calls, recording the calls."""

    def __init__(self, started: CloneStarted, free_fails: bool = False, recorded: bool = True) -> None:
        self.started, self.free_fails, self.recorded = started, free_fails, recorded
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

    def record_unless_given_back(self, done: FinishInput) -> bool:
        self.calls.append(("record", done.task_id))
        return self.recorded


def creation(halves: Halves) -> CreationActivities:
    return CreationActivities(cast(Any, halves), cast(Any, halves), asyncio.get_running_loop())


async def test_a_clone_that_ended_well_frees_its_slot_in_the_same_activity() -> None:
    halves = Halves(CloneStarted(upid=UPID, finished=True))
    started = await asyncio.to_thread(creation(halves).clone_vm, CLONE)  # a thread, as the worker runs it
    assert started == CloneStarted(upid=UPID, finished=True, slot_freed=True)
    assert halves.calls == [("start_clone", 100), ("release_clone_slot", "task-1")]


@pytest.mark.parametrize("started", [CloneStarted(upid=UPID), CloneStarted(upid=None)], ids=["running", "adopted"])
async def test_a_clone_still_running_keeps_its_slot(started: CloneStarted) -> None:
    halves = Halves(started)
    assert await asyncio.to_thread(creation(halves).clone_vm, CLONE) == started  # the run watches, then frees
    assert halves.calls == [("start_clone", 100)]


async def test_a_free_that_fails_is_left_to_the_run(caplog: pytest.LogCaptureFixture) -> None:
    halves = Halves(CloneStarted(upid=UPID, finished=True), free_fails=True)
    with caplog.at_level(logging.WARNING, logger="activities.creation"):
        started = await asyncio.to_thread(creation(halves).clone_vm, CLONE)
    assert started == CloneStarted(upid=UPID, finished=True, slot_freed=False)
    assert "task-1: could not free its clone slot at once; the run frees it" in caplog.text


async def test_the_configuration_records_the_vm_after_configuring_it() -> None:
    halves = Halves(CloneStarted(upid=UPID))
    await asyncio.to_thread(creation(halves).configure_and_record_vm, MERGED)
    assert halves.calls == [("configure_vm", 100), ("record", "task-1")]


async def test_a_configuration_whose_creation_was_undone_meanwhile_fails_for_good() -> None:
    halves = Halves(CloneStarted(upid=UPID), recorded=False)
    with pytest.raises(ApplicationError) as caught:
        await asyncio.to_thread(creation(halves).configure_and_record_vm, MERGED)
    assert (caught.value.type, caught.value.non_retryable) == (Failure.CONFIGURE_FAILED.value, True)
