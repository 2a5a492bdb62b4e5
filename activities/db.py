"""Database activities. Each takes milliseconds, so the workflow runs them as local activities: no extra
round trip through the Temporal server. Each is idempotent for its task id."""

from __future__ import annotations

from sqlalchemy import Engine
from temporalio import activity
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory

from db import clone_slots, quota
from db.engine import session
from db.models import Box, Template, TemplateUser
from payloads import (
    MSG_BOX_NOT_FOUND,
    MSG_FORBIDDEN,
    MSG_TEMPLATE_NOT_FOUND,
    NO_CLONE_SLOT,
    CloneSlotRequest,
    Failure,
    FinishInput,
    ReassignInput,
    ReserveInput,
    ResolveBoxInput,
    TemplateRef,
)


def refuse(failure: Failure, message: str) -> ApplicationError:
    # BENIGN: a refused request is an answer, not a fault; it is not logged as a worker warning.
    return ApplicationError(message, type=failure.value, non_retryable=True, category=ApplicationErrorCategory.BENIGN)


class DbActivities:
    def __init__(self, engine: Engine, clone_limit_per_node: int = 0, clone_limit_per_storage: int = 0):
        self.engine = engine
        self.clone_limit_per_node = clone_limit_per_node
        self.clone_limit_per_storage = clone_limit_per_storage

    @activity.defn
    def resolve_box(self, req: ResolveBoxInput) -> TemplateRef:
        """The box's template, if the user may use it."""
        with session(self.engine) as db:
            box = db.get(Box, req.box_id)
            if box is None:
                raise refuse(Failure.BOX_NOT_FOUND, MSG_BOX_NOT_FOUND)
            template = db.get(Template, box.template_id)
            if template is None:
                raise refuse(Failure.TEMPLATE_NOT_FOUND, MSG_TEMPLATE_NOT_FOUND)
            if not template.public and db.get(TemplateUser, (template.id, req.username)) is None:
                raise refuse(Failure.FORBIDDEN, MSG_FORBIDDEN)
            return TemplateRef(node=template.node, vmid=template.vmid)

    @activity.defn
    def reserve_quota(self, req: ReserveInput) -> int:
        """Hold the quota and a VMID for the task; returns the VMID."""
        try:
            return quota.reserve(self.engine, req)
        except quota.Refused as exc:
            raise refuse(exc.failure, exc.message) from exc

    @activity.defn
    def reassign_vmid(self, req: ReassignInput) -> int:
        try:
            return quota.reassign_vmid(self.engine, req.task_id, req.free_vmids, req.free_ranges)
        except quota.Refused as exc:
            raise refuse(exc.failure, exc.message) from exc

    @activity.defn
    def acquire_clone_slot(self, req: CloneSlotRequest) -> None:
        """Returns once the task holds a clone slot. While none is free it fails with a benign error, and its
        retry policy is the queue: nothing is held while the run waits its turn."""
        if not clone_slots.acquire(self.engine, req, self.clone_limit_per_node, self.clone_limit_per_storage):
            raise ApplicationError(
                f"no clone slot free on node {req.node} / storage {req.storage}",
                type=NO_CLONE_SLOT,
                category=ApplicationErrorCategory.BENIGN,
            )

    @activity.defn
    def try_clone_slot(self, req: CloneSlotRequest) -> bool:
        """Take a clone slot if one is free now."""
        return clone_slots.acquire(self.engine, req, self.clone_limit_per_node, self.clone_limit_per_storage)

    @activity.defn
    def release_clone_slot(self, task_id: str) -> list[str]:
        """Free the task's slot; returns the waiting tasks the freed capacity was handed to."""
        return clone_slots.release(self.engine, task_id, self.clone_limit_per_node, self.clone_limit_per_storage)

    @activity.defn
    def commit_creation(self, done: FinishInput) -> None:
        quota.commit(self.engine, done)

    @activity.defn
    def release_quota(self, task_id: str) -> None:
        quota.release(self.engine, task_id)
