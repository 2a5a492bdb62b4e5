"""A creation's two PVE steps, each with the database step that may follow it in the same activity: the clone,
then freeing its clone slot; the configuration, then the record of the VM (when it is the creation's last step).
Each pair as one activity saves the run a local activity and a workflow task's round trip between the two, which
was most of what a creation cost beyond its PVE work (figure 4 of `make bench`, BENCHMARKS.md).

The activities keep the names and inputs of the PVE steps they extend (`start_clone`, `configure_vm`): the
database step is asked for by a field of the input (`CloneInput.free_slot`, `ConfigureInput.record`) and
answered in the result. A worker of an earlier version ignores the field and answers without it, and the run
then frees the slot or records the VM in a local activity of its own, as before; so during a rolling upgrade
any worker may take the activity."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.db import DbActivities
from activities.heartbeats import Heartbeats
from activities.pve import PveActivities
from payloads import MSG_CONFIGURE_FAILED, CloneInput, CloneStarted, ConfigureInput, Failure

log = logging.getLogger(__name__)

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
        """PveActivities.start_clone; with `req.free_slot`, a clone that ended well while it watched also frees
        its clone slot and hands it over (DbActivities.release_clone_slot) at once. `slot_freed` says whether it
        did: if not (the clone outlasted the activity, or the free failed), the run frees the slot itself."""
        started = self.pve.start_clone(req)
        if not (req.free_slot and started.finished):
            return started
        with self._heartbeats.during():
            return dataclasses.replace(started, slot_freed=self._free_slot(req.task_id))

    def _free_slot(self, task_id: str) -> bool:
        hand_over = asyncio.run_coroutine_threadsafe(self.db.release_clone_slot(task_id), self.loop)
        try:
            hand_over.result(FREE_SLOT_SECONDS)
        except Exception:
            hand_over.cancel()
            log.warning("%s: could not free its clone slot at once; the run frees it", task_id, exc_info=True)
            return False
        return True

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
