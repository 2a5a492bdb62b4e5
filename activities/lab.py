"""A lab's activities: its admission (every VM checked and held at once, all or nothing) and the choice of a
node for a VM tried again, local activities (the POST waits for the first, and both take milliseconds); and,
in a lab an operator reset, what became of the creations it had begun before."""

from __future__ import annotations

import asyncio

from temporalio import activity
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from activities.db import DbActivities, Deadlines
from activities.failures import refuse
from activities.pve import PveActivities
from db import quota, vms
from payloads import (
    MAX_LAB_VMS,
    MSG_INVALID_NAME,
    MSG_PVE_NOT_READY,
    CreateFromBoxInput,
    EarlierCreation,
    Failure,
    InspectInput,
    LabAdmitInput,
    LabAdmitted,
    LabInput,
    LabVm,
    RetryTargetInput,
    TemplateFacts,
    TemplateRef,
    lab_vm_names,
)
from pve.placement import online_nodes, other_target, spread
from pve.vm_options import valid_vm_name


def lab_task_ids(lab_task_id: str, count: int) -> list[str]:
    """The creations' task ids: the lab's, numbered as the VMs' names are (`lab-...-01`)."""
    return [f"{lab_task_id}-{name.rsplit('-', 1)[1]}" for name in lab_vm_names("vm", count)]


def retry_task_id(task_id: str) -> str:
    """The task id of a VM's creation tried once more (`lab-...-01-retry`)."""
    return f"{task_id}-retry"


class LabActivities:
    def __init__(self, db: DbActivities, pve: PveActivities, client: Client):
        self.db = db
        self.pve = pve
        self.client = client

    @activity.defn
    def admit_lab(self, req: LabAdmitInput) -> LabAdmitted:
        """The checks of one creation, in the same order, for every target the lab uses; then the VMs placed
        over them and the quota and a VMID held for each, in one transaction. Safe to repeat (the reservations
        are keyed by the creations' task ids)."""
        ask = req.request
        # The API checks these too; a parent workflow may not have.
        if not 1 <= ask.count <= MAX_LAB_VMS:
            raise refuse(Failure.INVALID_REQUEST, f"Invalid request body: 'count' must be 1 to {MAX_LAB_VMS}")
        if not valid_vm_name(lab_vm_names(ask.name, ask.count)[-1]):  # the longest of the lab's names
            raise refuse(Failure.INVALID_REQUEST, MSG_INVALID_NAME)
        registered = self.db.template_of(ask.username, ask.box_id)
        template = TemplateRef(node=registered.node, vmid=registered.vmid)
        free_mb = online_nodes(self.pve.pve.get("cluster/resources"))
        if ask.targets:
            # The targets asked for: each must take the clone (the first that cannot answers, as for one VM).
            targets = list(dict.fromkeys(ask.targets))
            for target in targets:
                facts = self._inspect(template, target, ask)
        else:
            # Every online node that can take the clone (on a cluster whose storage is local to each node: the
            # template's node only); refused only when none can, with what the template's node says.
            targets, facts = self._nodes_that_take_it(template, sorted(free_mb), ask)
        task_ids = lab_task_ids(req.task_id, ask.count)
        # In a lab reset after a VM was made by its retry, that VM counts once, under the retry's id.
        retries = {task_id: retry_task_id(task_id) for task_id in task_ids}
        deadlines = Deadlines.of_this_attempt(ask.admit_by)  # see AdmissionActivities.admit
        ask_one = creation_input(ask, "", targets[0])
        vmids = self.db.reserve_lab(task_ids, ask_one, facts.free_ranges, retries, deadlines)
        nodes = spread(ask.count, targets, free_mb, ask.memory_mb)
        names = lab_vm_names(ask.name, ask.count)
        return LabAdmitted(
            vms=[
                LabVm(vm_name=name, vmid=vmid, node=node, task_id=task_id)
                for name, vmid, node, task_id in zip(names, vmids, nodes, task_ids, strict=True)
            ],
            targets=targets,
        )

    def _inspect(self, template: TemplateRef, target: str, ask: LabInput) -> TemplateFacts:
        """The template, the target node, its storage and the disk size, checked as for one VM."""
        return self.pve.inspect_template(
            InspectInput(template=template, target=target, storage=ask.storage, disk_gb=ask.disk_gb)
        )

    def _nodes_that_take_it(
        self, template: TemplateRef, nodes: list[str], ask: LabInput
    ) -> tuple[list[str], TemplateFacts]:
        taking: list[str] = []
        facts: TemplateFacts | None = None
        refusals: dict[str, ApplicationError] = {}
        for node in nodes:
            try:
                facts = self._inspect(template, node, ask)
                taking.append(node)
            except ApplicationError as refusal:
                if refusal.type == Failure.TEMPLATE_NOT_FOUND.value:
                    raise  # the same on every node
                refusals[node] = refusal
        if facts is None:
            if not refusals:
                raise refuse(Failure.PVE_NOT_READY, f"{MSG_PVE_NOT_READY}: no PVE node is online")
            raise refusals.get(template.node) or next(iter(refusals.values()))
        return taking, facts

    @activity.defn
    def retry_target(self, req: RetryTargetInput) -> str:
        """The node to try a failed VM again on: another online target with the most free memory."""
        return other_target(req.targets, req.failed, online_nodes(self.pve.pve.get("cluster/resources")))

    @activity.defn
    async def earlier_creation(self, task_ids: list[str]) -> EarlierCreation:
        """What became of the creations of these task ids (a VM's first try's, then its retry's) that the lab
        had begun before an operator reset it: one still running, else the VM one of them made (from the
        database, which holds it even after Temporal has forgotten the run), else neither. Runs first: once none
        runs, what the database says is final."""
        for task_id in task_ids:
            try:
                description = await self.client.get_workflow_handle(task_id).describe()
            except RPCError as exc:
                if exc.status != RPCStatusCode.NOT_FOUND:  # NOT_FOUND: never started, or long forgotten
                    raise
                continue
            if description.status == WorkflowExecutionStatus.RUNNING:
                return EarlierCreation(running=task_id)
        record = await asyncio.to_thread(vms.made_by, self.db.engine, task_ids)
        if record is None:
            return EarlierCreation()
        return EarlierCreation(made_by=record.task_id, vmid=record.vmid, node=record.node)

    @activity.defn
    def release_lab(self, task_ids: list[str]) -> None:
        """Give back the quota still held under any of these creations' task ids (a creation that never ran)."""
        for task_id in task_ids:
            quota.release(self.db.engine, task_id)


def creation_input(lab: LabInput, name: str, target: str) -> CreateFromBoxInput:
    """One VM of the lab as a creation's input (no admission deadline: the lab's admission held its quota)."""
    return CreateFromBoxInput(
        username=lab.username,
        box_id=lab.box_id,
        name=name,
        target=target,
        cpu_cores=lab.cpu_cores,
        memory_mb=lab.memory_mb,
        disk_gb=lab.disk_gb,
        storage=lab.storage,
        ssh_keys=list(lab.ssh_keys),
        start=lab.start,
    )
