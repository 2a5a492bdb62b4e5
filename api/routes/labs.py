"""POST /api/v1/vm/manage/labs (a lab: `count` VMs from one box) and DELETE labs/{task_id}. A lab's state is a
task's (GET tasks/{task_id}); it is cancelled as a creation is (POST tasks/{task_id}/cancel).

Endpoints only: admission is in api/admission.py, the Idempotency-Key in api/idempotency.py, the lab itself in
workflows/lab.py.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from temporalio.service import RPCError

from api.admission import new_task_id
from api.body_limit import MSG_BODY_TOO_LARGE
from api.deps import UNAUTHORIZED, CurrentUser, EngineDep, OwnedTask, SettingsDep, TemporalDep
from api.errors import TEMPORAL_UNAVAILABLE, ApiError, error_responses
from api.idempotency import MSG_KEY_REUSED, admit_lab_once
from api.routes.vm_manage import IdempotencyKey, admitter_for, one_of
from api.schemas import (
    DeletionData,
    LabAdmissionData,
    LabAnswer,
    LabDeleteAnswer,
    LabDeletionData,
    LabRequest,
    valid_vm_name,
)
from api.task_state import TASK_NOT_FOUND
from db import vms
from payloads import (
    MSG_BOX_NOT_FOUND,
    MSG_FORBIDDEN,
    MSG_INVALID_NAME,
    MSG_LAB_BEING_CREATED,
    MSG_LAB_DELETION_STARTED,
    MSG_LAB_STARTED,
    MSG_PER_VM_LIMIT,
    MSG_PLAN_NOT_FOUND,
    MSG_TEMPLATE_NOT_FOUND,
    MSG_TOTAL_LIMIT,
    MSG_UNAVAILABLE,
    LabVmStatus,
    TaskKind,
    lab_vm_names,
)
from workflows.delete_vm import start_deletion

router = APIRouter(prefix="/api/v1/vm/manage", tags=["labs"])


@router.post(
    "/labs",
    response_description="Admitted: every VM's name, VMID and node are fixed, and each is being created",
    responses=error_responses(
        {
            400: "A body that is not valid (`Invalid request body: ...` naming the field), an invalid VM name, a "
            "target node, storage or diskSize that does not fit (the message says which), or the plan's limits "
            f"for the whole lab: {one_of(MSG_PER_VM_LIMIT, MSG_TOTAL_LIMIT)}",
            401: one_of(UNAUTHORIZED),
            403: one_of(MSG_FORBIDDEN),
            404: one_of(MSG_BOX_NOT_FOUND, MSG_TEMPLATE_NOT_FOUND, MSG_PLAN_NOT_FOUND),
            413: one_of(MSG_BODY_TOO_LARGE),
            422: one_of(MSG_KEY_REUSED),
            503: f"{one_of(MSG_UNAVAILABLE)} (nor ever will be, for this request); {one_of(TEMPORAL_UNAVAILABLE)}",
        }
    ),
)
async def create_lab(
    body: LabRequest,
    username: CurrentUser,
    settings: SettingsDep,
    client: TemporalDep,
    engine: EngineDep,
    idempotency_key: IdempotencyKey = None,
) -> LabAnswer:
    # The VMs' names differ only in their number: the last is the longest, the one that may pass 128 characters.
    if not valid_vm_name(lab_vm_names(body.name, body.count)[-1]):
        raise ApiError(400, MSG_INVALID_NAME)
    input = body.to_input(username, settings.default_storage)
    admitter = admitter_for(client, engine, settings)
    if idempotency_key is None:
        admission = await admitter.admit_lab(new_task_id(body.box_id, "lab"), input)
    else:
        admission = await admit_lab_once(admitter, username, idempotency_key, input)
    return LabAnswer(code=200, message=MSG_LAB_STARTED, data=LabAdmissionData.of(admission))


@router.delete(
    "/labs/{task_id}",
    response_description="The deletion of every VM of the lab started (or runs), one task each",
    responses=error_responses(
        {
            401: one_of(UNAUTHORIZED),
            404: one_of(TASK_NOT_FOUND),
            409: f"{one_of(MSG_LAB_BEING_CREATED)}: cancel it instead",
            503: one_of(TEMPORAL_UNAVAILABLE),
        }
    ),
)
async def delete_lab(task: OwnedTask, settings: SettingsDep, client: TemporalDep, engine: EngineDep) -> LabDeleteAnswer:
    state = task.state
    assert state is not None, "OwnedTask lets only tasks with a state through"
    if state.kind != TaskKind.LAB:
        raise ApiError(404, TASK_NOT_FOUND)
    if not task.ended:
        raise ApiError(409, MSG_LAB_BEING_CREATED)
    deletions = []
    for vm in state.vms:
        if vm.status != LabVmStatus.SUCCEEDED or vm.vmid is None:
            continue  # never made (or made and then cleaned up by its own saga)
        try:
            record = await asyncio.to_thread(vms.deletable, engine, state.owner, vm.vmid)
            if record.task_id != vm.task_id:
                continue  # deleted already, and its VMID reused by another of the owner's VMs
            deletion = await start_deletion(client, settings.temporal_task_queue, engine, record)
        except vms.NotDeletable:
            continue  # deleted already (or being deleted by hand meanwhile: that deletion is its own task)
        except RPCError as exc:
            raise ApiError(503, TEMPORAL_UNAVAILABLE) from exc
        deletions.append(DeletionData(task_id=deletion, vmid=str(vm.vmid)))
    data = LabDeletionData(task_id=task.id, deletions=deletions)
    return LabDeleteAnswer(code=200, message=MSG_LAB_DELETION_STARTED, data=data)
