"""PVE tasks (a clone, a resize, a stop, a destroy): the node a UPID runs on, whether a task ended well, and
waiting for one to end. Synchronous, on a PveClient: activities call these from their thread, the repair
tool through asyncio.to_thread."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from pve.client import TRANSIENT_MESSAGES, PveClient, PveError, PveUnavailable

# The pace of the looks at a running task. One look right after the start catches tasks that end at once (a
# resize, a clone of a small template); then the looks grow apart as the task ages (a few for a task of
# seconds), like a person watching it would.
EARLY_LOOK = 0.05  # a first look at once: most short tasks have ended by then
POLL_FIRST = 0.25  # the next look, 0.25 s after the task started, as a script polling every 0.25 s would
POLL_GROWTH = 1.5
POLL_MAX = 1.0


class PveTaskFailed(Exception):
    """A PVE task that ended with an error: its exit status."""


def upid_node(upid: str) -> str:
    """The node a task runs on: its status can only be read there."""
    # UPID:<node>:<pid>:<pstart>:<starttime>:<type>:<id>:<user>:
    return upid.split(":")[1]


def is_transient_task_error(exit_status: str) -> bool:
    """A task that failed on a lock another task held (`can't lock file ... - got timeout`) or on a cluster
    hiccup may succeed when started again."""
    return bool(TRANSIENT_MESSAGES.search(exit_status))


def ended_well(status: Mapping[str, Any]) -> bool:
    """A task's status as PVE answers it: False while it runs, True if it ended well (`OK`, or with warnings);
    PveTaskFailed with its exit status if it ended in error."""
    if status.get("status") != "stopped":
        return False
    exit_status = str(status.get("exitstatus", ""))
    if exit_status == "OK" or exit_status.startswith("WARNINGS"):
        return True
    raise PveTaskFailed(exit_status)


def task_done(pve: PveClient, upid: str) -> bool:
    """One look at a task: ended_well of its current status."""
    return ended_well(pve.get(f"nodes/{upid_node(upid)}/tasks/{upid}/status"))


def wait_task(pve: PveClient, upid: str, limit: float) -> bool:
    """Look at the task until it ends well (True) or `limit` seconds pass (False); PveTaskFailed if it failed.
    A look that gets no answer (PVE slow, a connection lost) is not the task's end: the task runs on all the
    same, and the next look is taken in its turn; PveUnavailable only if the last look got none either.
    Blocks the calling thread: an activity that calls it heartbeats meanwhile from another thread."""
    started = time.monotonic()
    look_at, interval = EARLY_LOOK, POLL_FIRST
    missed: PveUnavailable | None = None
    while look_at <= limit:
        time.sleep(max(0.0, started + look_at - time.monotonic()))
        try:
            if task_done(pve, upid):
                return True
            missed = None
        except PveUnavailable as exc:
            # Failing the step here would throw away what it has done (the config written, the clone begun)
            # for a look: measured with one request in four hung, a configuration took 8 to 16 attempts.
            missed = exc
        if look_at < POLL_FIRST:
            scheduled = POLL_FIRST
        else:
            interval = min(interval * POLL_GROWTH, POLL_MAX)
            scheduled = look_at + interval
        # After a slow answer, the next look still waits its turn instead of following at once.
        look_at = max(scheduled, time.monotonic() - started + EARLY_LOOK)
    if missed is not None:
        raise missed
    return False


def wait_until_done(pve: PveClient, upid: str, limit: float) -> None:
    """Wait for a task that is one part of a larger step (a config write, a resize, a stop, a destroy).
    Raises PveUnavailable when doing the step again may succeed (the task failed on a lock another task held,
    or did not end in time), PveError when it will not."""
    try:
        finished = wait_task(pve, upid, limit)
    except PveTaskFailed as exc:
        if is_transient_task_error(str(exc)):
            raise PveUnavailable(str(exc)) from exc
        raise PveError(500, str(exc)) from exc
    if not finished:
        raise PveUnavailable(f"PVE task {upid} did not end within {limit:.0f} s")
