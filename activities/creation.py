"""A creation's PVE steps with the database step that follows each, in one activity: the clone, then freeing its
clone slot; the configuration, then the record of the VM (when it is the creation's last step). Each pair as one
activity saves the run a local activity and a workflow task's round trip between the two, which is most of
what a creation cost beyond its PVE work (figure 4 of `make bench`, BENCHMARKS.md). The workflow still frees
the slot itself on every other way out, and a failed free here only leaves that to it."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.db import DbActivities
from activities.pve import PveActivities
from payloads import MSG_CONFIGURE_FAILED, CloneInput, CloneStarted, ConfigureAndRecord, Failure

log = logging.getLogger(__name__)

# How long the clone's activity waits for the slot's hand-over (a database write and a signal per run told)
# before it leaves the free to the workflow.
FREE_SLOT_SECONDS = 10


class CreationActivities:
    def __init__(self, pve: PveActivities, db: DbActivities, loop: asyncio.AbstractEventLoop):
        """`loop`: the worker's event loop, on which the slot's hand-over runs (it signals runs through the
        worker's client)."""
        self.pve = pve
        self.db = db
        self.loop = loop

    @activity.defn
    def clone_vm(self, req: CloneInput) -> CloneStarted:
        """PveActivities.start_clone; if the clone ended well while it watched, free the clone slot and hand it
        over (DbActivities.release_clone_slot) at once, rather than in a local activity of the workflow's next
        turn. A free that fails is left to the workflow (`slot_freed` False), which frees the slot on every way."""
        started = self.pve.start_clone(req)
        if not started.finished:
            return started
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

    @activity.defn
    def configure_and_record_vm(self, req: ConfigureAndRecord) -> None:
        """PveActivities.configure_vm, then DbActivities.commit_creation, unless the run has given the quota back
        meanwhile: a run cancelled while this ran stops waiting for it and undoes the creation, and a record
        written after that undo would count a destroyed VM against the plan. Safe to repeat, like both halves."""
        self.pve.configure_vm(req.configure)
        if not self.db.record_unless_given_back(req.record):
            raise ApplicationError(
                MSG_CONFIGURE_FAILED,
                "the creation was undone before its VM was recorded",
                type=Failure.CONFIGURE_FAILED.value,
                non_retryable=True,
            )
