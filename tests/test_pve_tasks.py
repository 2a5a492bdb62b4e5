"""PVE tasks: the node of a UPID, whether a task ended well, failed, or failed on something that may clear,
and the watch loop's limit. Pure or against a stand-in for the client: no servers."""

from __future__ import annotations

from typing import Any, cast

import pytest

from pve.client import PveClient, PveError, PveUnavailable
from pve.tasks import (
    PveTaskFailed,
    ended_well,
    is_transient_task_error,
    upid_node,
    wait_task,
    wait_until_done,
)

UPID = "UPID:pve2:000A1B2C:0123ABCD:6750A1B2:qmclone:9000:root@pam:"


def test_a_upid_names_the_node_the_task_runs_on() -> None:
    assert upid_node(UPID) == "pve2"


def test_a_running_task_has_not_ended() -> None:
    assert ended_well({"status": "running"}) is False
    assert ended_well({}) is False


@pytest.mark.parametrize("exit_status", ["OK", "WARNINGS: 2"])
def test_a_task_stopped_with_ok_or_warnings_ended_well(exit_status: str) -> None:
    assert ended_well({"status": "stopped", "exitstatus": exit_status}) is True


@pytest.mark.parametrize("exit_status", ["unable to create VM 100 - disk full", "", "job errors", "OKAY"])
def test_a_task_stopped_with_anything_else_failed_with_its_exit_status(exit_status: str) -> None:
    with pytest.raises(PveTaskFailed) as failed:
        ended_well({"status": "stopped", "exitstatus": exit_status})
    assert str(failed.value) == exit_status


@pytest.mark.parametrize(
    ("exit_status", "transient"),
    [
        ("can't lock file '/var/lock/qemu-server/lock-100.conf' - got timeout", True),
        ("cluster not ready - no quorum?", True),
        ("VM 100 is locked (clone)", True),
        ("storage 'NFS' does not exist", False),
        ("unable to create VM 100 - disk full", False),
    ],
)
def test_a_failure_on_a_lock_or_the_cluster_may_clear(exit_status: str, transient: bool) -> None:
    assert is_transient_task_error(exit_status) is transient


class Tasks:
    """A PveClient stand-in that answers task status reads from a script, and counts them."""

    def __init__(self, *statuses: dict[str, Any]):
        self.statuses = list(statuses)
        self.looks: list[str] = []

    def get(self, path: str, **_params: Any) -> Any:
        self.looks.append(path)
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        if status is NO_ANSWER:
            raise PveUnavailable(f"GET {path}: Read timed out")
        return status

    @property
    def client(self) -> PveClient:
        return cast(PveClient, self)


RUNNING = {"status": "running"}
NO_ANSWER: dict[str, Any] = {}  # this look gets no answer in time


def test_the_watch_loop_looks_at_the_tasks_node_until_it_ends() -> None:
    pve = Tasks(RUNNING, RUNNING, {"status": "stopped", "exitstatus": "OK"})
    assert wait_task(pve.client, UPID, limit=5) is True
    assert pve.looks == [f"nodes/pve2/tasks/{UPID}/status"] * 3


def test_the_watch_loop_gives_up_at_its_limit() -> None:
    pve = Tasks(RUNNING)
    assert wait_task(pve.client, UPID, limit=0.3) is False
    assert len(pve.looks) == 2  # at once, then at POLL_FIRST; the next would be past the limit


def test_a_task_within_a_step_fails_it_for_good_or_for_a_retry() -> None:
    with pytest.raises(PveError):
        wait_until_done(Tasks({"status": "stopped", "exitstatus": "disk full"}).client, UPID, 5)
    lock = {"status": "stopped", "exitstatus": "can't lock file 'x' - got timeout"}
    with pytest.raises(PveUnavailable):
        wait_until_done(Tasks(lock).client, UPID, 5)
    with pytest.raises(PveUnavailable):
        wait_until_done(Tasks(RUNNING).client, UPID, 0.1)
    wait_until_done(Tasks({"status": "stopped", "exitstatus": "OK"}).client, UPID, 5)


def test_a_look_without_an_answer_is_not_the_tasks_end() -> None:
    """One request in four hung (fakepve's flaky network) failed a configuration's attempt at any status read:
    the watch looks again in its turn instead."""
    pve = Tasks(RUNNING, NO_ANSWER, NO_ANSWER, {"status": "stopped", "exitstatus": "OK"})
    assert wait_task(pve.client, UPID, limit=5) is True
    assert len(pve.looks) == 4
    with pytest.raises(PveUnavailable):  # no answer up to the limit: the step is tried again
        wait_task(Tasks(RUNNING, NO_ANSWER).client, UPID, limit=0.3)
    assert wait_task(Tasks(NO_ANSWER, RUNNING).client, UPID, limit=0.3) is False  # answered last: still running
