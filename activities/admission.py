"""Admission as one local activity: the box and permission (database), the template, node, storage and disk
(PVE), then the plan, the quota and the VMID (database), in the order the contract fixes. One activity, not
three: the POST waits for it, and every step between activities costs a turn of the workflow."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.db import DbActivities, Deadlines
from activities.pve import PveActivities
from db.box_options import BoxSettings
from payloads import (
    AdmitInput,
    Admitted,
    BoxOptions,
    CloneSlotRequest,
    CloudInit,
    Failure,
    InspectInput,
    Network,
    TemplateRef,
)
from pve.ownership import TASK_ID


class AdmissionActivities:
    def __init__(self, db: DbActivities, pve: PveActivities, pve_read_threads: int = 8):
        """`pve_read_threads`: threads that read PVE's view while an admission's database read runs, as many
        as admissions may run at once (worker.py: as many as its activity threads). Started as needed."""
        self.db = db
        self.pve = pve
        # Not the activities' own pool: an admission waiting there for a read queued behind it could wait forever.
        self.pve_reads = ThreadPoolExecutor(max_workers=pve_read_threads, thread_name_prefix="admission-pve")

    @activity.defn
    def admit(self, req: AdmitInput) -> Admitted:
        """Every check of the request, then the reservation; safe to repeat (the reservation is keyed by the
        task id)."""
        ask = req.request
        if not TASK_ID.fullmatch(req.task_id):
            # A parent workflow chose the id: the clone's owner marker could not name it, and the run could
            # never tell its VM from another's. Refused now, before anything is held.
            raise ApplicationError(
                f"Invalid task id {req.task_id!r}: a creation's workflow id holds letters, digits, '_', '.' and "
                "'-' only, and starts with a letter or digit",
                type=Failure.INVALID_REQUEST.value,
                non_retryable=True,
            )
        # PVE's view is read while the database answers for the box (the checks still come in the contract's
        # order: a box refused is refused whatever PVE says). A POST waits for all of this.
        resources = self.pve_reads.submit(self.pve.cluster_resources)
        try:
            registered = self.db.template_of(ask.username, ask.box_id)
        except BaseException:
            resources.cancel()  # if it has not begun; else its answer (or error) goes unread
            raise
        facts = self.pve.check_template(
            InspectInput(
                template=TemplateRef(node=registered.node, vmid=registered.vmid),
                target=ask.target,
                storage=ask.storage,
                disk_gb=ask.disk_gb,
            ),
            resources.result(),
        )
        template = TemplateRef(node=facts.node, vmid=registered.vmid)
        # The clone slot too, here: asked by a step of its own, it would hold the POST's answer (sent when the
        # workflow task ends) for one more local activity. The workflow frees it on every way out. Past the
        # caller's deadline (on the clock: the workflow's own stands still while its local activities run) or
        # this attempt's, nothing is written.
        slot = CloneSlotRequest(task_id=req.task_id, node=facts.node, storage=facts.storage, owner=ask.username)
        deadlines = Deadlines.of_this_attempt(ask.admit_by)
        vmid, clone_slot = self.db.reserve(req.task_id, ask, facts.free_ranges, slot, deadlines)
        return Admitted(
            template=template,
            facts=facts,
            vmid=vmid,
            box=box_options(registered.box),
            clone_slot=clone_slot,
            changes_only=True,
            steps_merged=True,
            configure_with_clone=True,
        )


def box_options(box: BoxSettings) -> BoxOptions:
    """The box's options as the workflow reads them (the database's form is db/'s own)."""
    return BoxOptions(
        start=box.start,
        wait_for_ip_seconds=box.wait_for_ip_seconds,
        cloud_init=CloudInit(**asdict(box.cloud_init)) if box.cloud_init is not None else None,
        pool=box.pool,
        tags=list(box.tags),
        network=Network(**asdict(box.network)) if box.network is not None else None,
    )
