"""Database activities. Each takes milliseconds, so the workflow runs them as local activities: no extra
round trip through the Temporal server. Each is idempotent for its task id. Here the Temporal payloads are
turned into the plain arguments of db/, and db/'s refusals into ApplicationErrors."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import Engine
from temporalio import activity

from activities.failures import refuse
from db import boxes, clone_slots, quota
from db.engine import session
from payloads import (
    MSG_UNAVAILABLE,
    CloneSlotRequest,
    CreateFromBoxInput,
    Failure,
    FinishInput,
    ReassignInput,
)


@contextmanager
def _refusals() -> Iterator[None]:
    try:
        yield
    except quota.Refused as exc:
        raise refuse(exc.failure, exc.message) from exc


@dataclass(frozen=True)
class Deadlines:
    """When an admission's reservation may no longer be written: the caller's deadline (`admit_by`: past it the
    REST API has answered 503 and gives the request up) and the end of the activity's attempt (past it the
    workflow has timed the attempt out, or been cancelled, and may already have given back what the run held:
    see workflows.policies.admission_settled). Checked inside the transaction, once its locks are held, so
    that a write held up behind them past either one rolls back instead of holding quota for no run. (The SDK
    also raises CancelledError in the thread of an activity it gives up; this holds without that, and bounds
    how long the workflow waits.)"""

    admit_by: datetime | None
    attempt_ends: datetime | None

    def check(self) -> None:
        now = datetime.now(UTC)
        if self.admit_by is not None and now > self.admit_by:
            raise refuse(Failure.UNAVAILABLE, MSG_UNAVAILABLE)
        if self.attempt_ends is not None and now > self.attempt_ends:
            raise TimeoutError("the admission's attempt ran out of time before its reservation was written")

    @classmethod
    def of_this_attempt(cls, admit_by: datetime | None) -> Deadlines:
        """`admit_by`, and the end of the running activity's attempt (its start plus its start-to-close)."""
        info = activity.info()
        timeout = info.start_to_close_timeout
        return cls(admit_by, info.started_time + timeout if timeout else None)


class DbActivities:
    def __init__(
        self, engine: Engine, clone_limits: clone_slots.Limits, tell_slot_granted: Callable[[str], Awaitable[bool]]
    ):
        """`tell_slot_granted(task_id)` tells a waiting run it holds a clone slot now, False if the run has
        ended (worker.py gives `workflows.clone_turns.tell_slot_granted` bound to its client)."""
        self.engine = engine
        self.clone_limits = clone_limits
        self.tell_slot_granted = tell_slot_granted

    # ----------------------------------------------------- admission's steps (called by AdmissionActivities)

    def template_of(self, username: str, box_id: str) -> boxes.TemplateVm:
        """The box's template and options, if the user may use it (the API checked this too, before starting the
        run); AdmissionActivities turns them into payloads."""
        with _refusals():
            return boxes.template_for(self.engine, username, box_id)

    def reserve(
        self,
        task_id: str,
        ask: CreateFromBoxInput,
        free_ranges: list[list[int]],
        slot: CloneSlotRequest,
        deadlines: Deadlines,
    ) -> tuple[int, int]:
        """Hold the quota and a VMID for the task, then take a clone slot or queue for one, in one transaction
        (one commit fewer before the POST's answer), written only within `deadlines`; returns the VMID and what
        `try_clone_slot` answers."""
        with _refusals(), session(self.engine) as db, db.begin():
            vmid = quota.reserve_in(db, task_id, ask.username, _size(ask), free_ranges)
            holds = clone_slots.acquire_in(db, slot.task_id, slot.node, slot.storage, self.clone_limits, slot.owner)
            deadlines.check()
        return vmid, self._place(slot.task_id, holds)

    def reserve_lab(
        self,
        task_ids: list[str],
        ask: CreateFromBoxInput,
        free_ranges: list[list[int]],
        retries: dict[str, str],
        deadlines: Deadlines,
    ) -> list[int]:
        """Hold the quota and a VMID for each of a lab's creations, all or nothing, written only within
        `deadlines`; returns the VMIDs. A VM whose retry (`retries`: task id -> the retry's) holds quota or made
        it counts once (quota.reserve_all)."""
        with _refusals():
            return quota.reserve_all(
                self.engine, task_ids, ask.username, _size(ask), free_ranges, retries, before_commit=deadlines.check
            )

    # ------------------------------------------------------------------------------------ activities

    @activity.defn
    def reassign_vmid(self, req: ReassignInput) -> int:
        with _refusals():
            return quota.reassign_vmid(self.engine, req.task_id, req.free_ranges)

    @activity.defn
    def try_clone_slot(self, req: CloneSlotRequest) -> int:
        """Take a clone slot if one is free now (0), else queue for one: the task's place in the line (1: next)."""
        holds = clone_slots.acquire(self.engine, req.task_id, req.node, req.storage, self.clone_limits, req.owner)
        return self._place(req.task_id, holds)

    def _place(self, task_id: str, holds: bool) -> int:
        if holds:
            return 0
        # Only a run that has to wait pays for this look (operators see it in the run's current details).
        return max(1, clone_slots.place_in_line(self.engine, task_id))

    @activity.defn
    async def release_clone_slot(self, task_id: str) -> list[str]:
        """Free the task's slot and tell the runs it was handed to; returns those told. Safe to repeat: a repeat
        tells the same runs (see clone_slots.release_and_hand_over)."""
        return await clone_slots.release_and_hand_over(self.engine, task_id, self.clone_limits, self.tell_slot_granted)

    @activity.defn
    def commit_creation(self, done: FinishInput) -> None:
        quota.commit(self.engine, _created_vm(done))

    def record_unless_given_back(self, done: FinishInput) -> bool:
        """commit_creation, unless the run has given the quota back meanwhile (then False: see quota.commit)."""
        return quota.commit(self.engine, _created_vm(done), unless_given_back=True)

    @activity.defn
    def release_quota(self, task_id: str, failed: bool = False) -> None:
        """Undo what the creation holds against the plan: its quota, or its record if that was written (see
        quota.undo_creation; `failed`: not cancelled, a lab VM's first try hands its quota over to its retry).
        The workflow calls it after admission failed, or after destroying the VM."""
        quota.undo_creation(self.engine, task_id, hand_over=failed)


def _created_vm(done: FinishInput) -> quota.CreatedVm:
    return quota.CreatedVm(
        done.task_id,
        done.username,
        done.vmid,
        done.node,
        done.name,
        _size(done),
        done.box_id,
        done.storage,
        done.ip_addresses,
    )


def _size(wanted: CreateFromBoxInput | FinishInput) -> quota.Size:
    return quota.Size(cores=wanted.cpu_cores, memory_mb=wanted.memory_mb, disk_gb=wanted.disk_gb)
