"""GET /api/v1/vm/manage/vms, DELETE /api/v1/vm/manage/vms/{vmid} and POST /api/v1/vm/manage/vms/{vmid}/power:
the caller's VMs, from the service's records (db/vms.py), their deletion (workflows/delete_vm.py) and their
power actions (workflows/power_vm.py).

`OwnedVm` is the one ownership check of a VMID in the path: another user's VM, an unknown VMID and a deleted
VM are the same 404, so that VMIDs reveal nothing."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from temporalio.service import RPCError

from api.deps import UNAUTHORIZED, CurrentUser, EngineDep, SettingsDep, TemporalDep
from api.errors import TEMPORAL_UNAVAILABLE, ApiError, error_responses
from api.routes.vm_manage import one_of
from api.schemas import DeleteAnswer, DeletionData, PowerAnswer, PowerBody, PowerData, VmData, VmsAnswer, VmsData
from db import vms
from db.tokens import as_utc
from payloads import (
    MSG_DELETION_STARTED,
    MSG_POWER_STARTED,
    MSG_VM_BEING_CREATED,
    MSG_VM_BEING_DELETED,
    MSG_VM_NOT_FOUND,
)
from workflows.delete_vm import start_deletion
from workflows.power_vm import start_power

router = APIRouter(prefix="/api/v1/vm/manage", tags=["vms"])

MAX_VMID = 999_999_999  # PVE's largest
BAD_CURSOR = "Invalid query parameter: 'next' is not a cursor of this listing"


def owned_vm(vmid: str, username: CurrentUser, engine: EngineDep) -> vms.VmRecord:
    """The caller's VM `vmid`, not deleted: 404 `VM not found` otherwise (a VMID that is no number included),
    409 `VM is still being created` while its creation runs (its record is written as its last step)."""
    if not vmid.isdecimal() or not 0 < int(vmid) <= MAX_VMID:
        raise ApiError(404, MSG_VM_NOT_FOUND)
    try:
        return vms.deletable(engine, username, int(vmid))
    except vms.NotDeletable as exc:
        raise ApiError(exc.status, exc.message) from exc


OwnedVm = Annotated[vms.VmRecord, Depends(owned_vm)]


@router.delete(
    "/vms/{vmid}",
    response_description="The deletion started; a repeat while it runs answers the same task",
    responses=error_responses(
        {
            401: one_of(UNAUTHORIZED),
            404: one_of(MSG_VM_NOT_FOUND),
            409: f"{one_of(MSG_VM_BEING_CREATED)}: cancel its creation instead",
            503: one_of(TEMPORAL_UNAVAILABLE),
        }
    ),
)
async def delete_vm(vm: OwnedVm, settings: SettingsDep, client: TemporalDep, engine: EngineDep) -> DeleteAnswer:
    try:
        task_id = await start_deletion(client, settings.temporal_task_queue, engine, vm)
    except vms.NotDeletable as exc:  # deleted meanwhile
        raise ApiError(exc.status, exc.message) from exc
    except RPCError as exc:
        raise ApiError(503, TEMPORAL_UNAVAILABLE) from exc
    return DeleteAnswer(code=200, message=MSG_DELETION_STARTED, data=DeletionData(task_id=task_id, vmid=str(vm.vmid)))


@router.post(
    "/vms/{vmid}/power",
    response_description="The power action started; GET tasks/{task_id} follows it",
    responses=error_responses(
        {
            400: 'The body is not `{"action": "start" | "shutdown" | "stop" | "reboot"}`',
            401: one_of(UNAUTHORIZED),
            404: one_of(MSG_VM_NOT_FOUND),
            409: one_of(MSG_VM_BEING_CREATED, MSG_VM_BEING_DELETED),
            503: one_of(TEMPORAL_UNAVAILABLE),
        }
    ),
)
async def power_vm(vm: OwnedVm, body: PowerBody, settings: SettingsDep, client: TemporalDep) -> PowerAnswer:
    # Checked again by the run itself, which acts on no VM being deleted or without its creation's marker.
    if vm.deleting:
        raise ApiError(409, MSG_VM_BEING_DELETED)
    try:
        task_id = await start_power(client, settings.temporal_task_queue, vm, body.action.value)
    except RPCError as exc:
        raise ApiError(503, TEMPORAL_UNAVAILABLE) from exc
    return PowerAnswer(code=200, message=MSG_POWER_STARTED, data=PowerData(task_id=task_id, vmid=str(vm.vmid)))


@router.get(
    "/vms",
    response_description="The caller's VMs that the service created and that are not deleted, newest first",
    responses=error_responses({400: BAD_CURSOR, 401: one_of(UNAUTHORIZED)}),
)
def list_vms(
    username: CurrentUser,
    engine: EngineDep,
    limit: Annotated[int, Query(ge=1, le=200, description="VMs per page")] = 50,
    next: Annotated[str | None, Query(description="the cursor from the previous page")] = None,
) -> VmsAnswer:
    page, following = vms.page_of_vms(engine, username, limit, _cursor(next) if next else None)
    data = VmsData(vms=[_vm_data(vm) for vm in page], next=_encode(following) if following else None)
    return VmsAnswer(code=200, message="OK", data=data)


def _vm_data(vm: vms.VmRecord) -> VmData:
    return VmData(
        vmid=str(vm.vmid),
        vm_name=vm.name,
        node=vm.node,
        box_id=vm.box_id,
        cpu_cores=vm.cores,
        memory_mb=vm.memory_mb,
        disk_gb=vm.disk_gb,
        storage=vm.storage,
        task_id=vm.task_id,
        created_at=as_utc(vm.created_at).strftime("%Y-%m-%dT%H:%M:%SZ"),
        ip_addresses=vm.ip_addresses,
        deleting=vm.deleting,
    )


def _encode(cursor: vms.Cursor) -> str:
    """Opaque to clients: the last record's creation time (as the database gave it) and task id."""
    created_at, task_id = cursor
    return base64.urlsafe_b64encode(json.dumps([created_at.isoformat(), task_id]).encode()).decode()


def _cursor(text: str) -> vms.Cursor:
    """The cursor a client sent back: only what _encode can have made gets through (a crafted one is a 400,
    never a database error): an instant in UTC (the database keeps UTC) and a task id without control
    characters."""
    try:
        created_at, task_id = json.loads(base64.urlsafe_b64decode(text.encode()))
        moment = datetime.fromisoformat(created_at)
        moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    except (binascii.Error, UnicodeError, ValueError, TypeError, OverflowError) as exc:
        raise ApiError(400, BAD_CURSOR) from exc
    if not isinstance(task_id, str) or not task_id.isprintable():
        raise ApiError(400, BAD_CURSOR)
    return moment, task_id
