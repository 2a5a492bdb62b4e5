"""A creation's two PVE steps, each with the steps that may follow it in the same activity: the clone, then
freeing its clone slot and, once the clone has ended well, the configuration; the configuration, then the record
of the VM (when it is the creation's last step). Each step joined to the one before saves the run an activity or
a local activity and a workflow task's round trip between the two, which was most of what a creation cost beyond
its PVE work (figure 4 of `make bench`, BENCHMARKS.md).

The activities keep the names and inputs of the PVE steps they extend (`start_clone`, `configure_vm`): a step
joined on is asked for by a field of the input (`CloneInput.free_slot` and `.configure`, `ConfigureInput.record`)
and answered in the result. A worker of an earlier version ignores the field and answers without it, and the run
then takes that step itself, as before; so during a rolling upgrade any worker may take the activity. The
configuration joined to the clone is tried once: if that fails, the run's own configuration step does it again,
with its retries, or, after an error no retry changes, fails at once with it; either way a creation whose
configuration fails answers the configuration's message, never the clone's. The clone's activity never records
the VM: a cancellation during the clone undoes the creation (CreateFromBoxWorkflow._start_clone)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from datetime import UTC, datetime

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.db import DbActivities
from activities.heartbeats import Heartbeats
from activities.pve import PveActivities
from payloads import FINAL_FAILURES, MSG_CONFIGURE_FAILED, CloneInput, CloneStarted, ConfigureInput, Failure

log = logging.getLogger(__name__)

# The clone's activity configures the VM only with this much left of its time (both its timeouts): a configuration
# may wait on two PVE tasks (activities/pve.py's SHORT_TASK_WAIT each), and one cut short by the activity's
# timeout would fail the clone. With less left (a clone that took its retries), the run's own configuration step
# does it, with its own time: the workflow's CONFIGURE_TIMEOUT, which the clone's activity is given on top.
CONFIGURE_SECONDS = 180

# How long the clone's activity waits for the slot's hand-over (a database write and a signal per run told, a
# few milliseconds) before it leaves the free to the run. It heartbeats meanwhile.
FREE_SLOT_SECONDS = 30


class CreationActivities:
    def __init__(self, pve: PveActivities, db: DbActivities, loop: asyncio.AbstractEventLoop):
        """`loop`: the worker's event loop, on which the slot's hand-over runs (it signals runs through the
        worker's client)."""
        self.pve = pve
        self.db = db
        self.loop = loop
        self._heartbeats = Heartbeats()

    @activity.defn(name="start_clone")
    def start_clone(self, req: CloneInput) -> CloneStarted:
        """PveActivities.start_clone; a clone that ended well while it watched then, with `req.free_slot`, also
        frees its clone slot and hands it over (DbActivities.release_clone_slot), and with `req.configure`
        configures the VM (configure_vm). `slot_freed` and `configured` say whether it did: if not (the clone
        outlasted the activity, or that step failed), the run takes the step itself."""
        started = self.pve.start_clone(req)
        if not started.finished:
            return started
        with self._heartbeats.during():
            if req.free_slot:
                started = dataclasses.replace(started, slot_freed=self._free_slot(req.task_id))
            if req.configure is not None and seconds_left(activity.info()) >= CONFIGURE_SECONDS:
                started = self._configure_at_once(req.configure, started)
        return started

    def _free_slot(self, task_id: str) -> bool:
        hand_over = asyncio.run_coroutine_threadsafe(self.db.release_clone_slot(task_id), self.loop)
        try:
            hand_over.result(FREE_SLOT_SECONDS)
        except Exception:
            hand_over.cancel()
            log.warning("%s: could not free its clone slot at once; the run frees it", task_id, exc_info=True)
            return False
        return True

    def _configure_at_once(self, req: ConfigureInput, started: CloneStarted) -> CloneStarted:
        """configure_vm's work, once. A final error is handed to the run, which fails its configuration with it
        (no retry could change it: configure_vm's policy would not retry it either); any other leaves the
        configuration to the run's own step, with its retries."""
        try:
            self.configure_vm(req)
        except Exception as exc:
            if isinstance(exc, ApplicationError) and (exc.non_retryable or exc.type in FINAL_FAILURES):
                return dataclasses.replace(started, configure_failure=str(exc))
            log.warning("%s: could not configure VM %s with its clone (%s); the run does", req.task_id, req.vmid, exc)
            return started
        return dataclasses.replace(started, configured=True)

    @activity.defn(name="configure_vm")
    def configure_vm(self, req: ConfigureInput) -> bool | None:
        """PveActivities.configure_vm; with `req.record`, then DbActivities.commit_creation (True: recorded),
        unless the run has given the quota back meanwhile: a run cancelled while this ran stops waiting for it
        and undoes the creation, and a record written after that undo would count a destroyed VM against the
        plan. Safe to repeat, like both halves."""
        self.pve.configure_vm(req)
        if req.record is None:
            return None
        with self._heartbeats.during():
            recorded = self.db.record_unless_given_back(req.record)
        if not recorded:
            raise ApplicationError(
                MSG_CONFIGURE_FAILED,
                "the creation was undone before its VM was recorded",
                type=Failure.CONFIGURE_FAILED.value,
                non_retryable=True,
            )
        return True


def seconds_left(info: activity.Info) -> float:
    """Seconds until the first of the activity's timeouts: its attempt's start-to-close, and its schedule-to-close
    (all attempts together, from the first one's schedule)."""
    now = datetime.now(UTC)
    left = (
        [(info.started_time + info.start_to_close_timeout - now).total_seconds()] if info.start_to_close_timeout else []
    )
    if info.schedule_to_close_timeout:
        left.append((info.scheduled_time + info.schedule_to_close_timeout - now).total_seconds())
    return min(left, default=float("inf"))
