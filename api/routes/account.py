"""GET /api/v1/vm/manage/quota and GET /api/v1/vm/manage/boxes: the caller's plan and how much of it is used,
and the boxes the caller may use (db/account.py). Plain `def`s: FastAPI runs them on its thread pool, so the
database reads never block the event loop."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import UNAUTHORIZED, CurrentUser, EngineDep
from api.errors import ApiError, error_responses
from api.routes.vm_manage import one_of
from api.schemas import (
    BoxData,
    BoxesAnswer,
    BoxesData,
    Limits,
    NetworkData,
    QuotaAnswer,
    QuotaData,
    Totals,
    Used,
)
from db.account import boxes_for, quota_of
from db.quota import Refused
from payloads import MSG_PLAN_NOT_FOUND

router = APIRouter(prefix="/api/v1/vm/manage", tags=["account"])


@router.get(
    "/quota",
    response_description="The caller's plan, what counts against it and what is left",
    responses=error_responses({401: one_of(UNAUTHORIZED), 404: one_of(MSG_PLAN_NOT_FOUND)}),
)
def get_quota(username: CurrentUser, engine: EngineDep) -> QuotaAnswer:
    try:
        quota = quota_of(engine, username)
    except Refused as exc:
        raise ApiError(exc.failure.status, exc.message) from exc
    plan, used = quota.plan, quota.used
    data = QuotaData(
        plan=plan.id,
        per_vm=Limits(cores=plan.per_vm_cores, memory_mb=plan.per_vm_memory_mb, disk_gb=plan.per_vm_disk_gb),
        total=Totals(
            cores=plan.total_cores, memory_mb=plan.total_memory_mb, disk_gb=plan.total_disk_gb, vms=plan.total_vms
        ),
        used=Used(cores=used.cores, memory_mb=used.memory_mb, disk_gb=used.disk_gb, vms=used.vms),
        # Never below 0: a plan made smaller than what its user already has leaves nothing, not a debt.
        available=Totals(
            cores=max(0, plan.total_cores - used.cores),
            memory_mb=max(0, plan.total_memory_mb - used.memory_mb),
            disk_gb=max(0, plan.total_disk_gb - used.disk_gb),
            vms=max(0, plan.total_vms - used.vms) if plan.total_vms is not None else None,
        ),
    )
    return QuotaAnswer(code=200, message="OK", data=data)


@router.get(
    "/boxes",
    response_description="The boxes the caller may use",
    responses=error_responses({401: one_of(UNAUTHORIZED)}),
)
def get_boxes(username: CurrentUser, engine: EngineDep) -> BoxesAnswer:
    boxes = [
        BoxData(
            id=box.id,
            name=box.name,
            template=box.template_name,
            start=box.options.start,
            cloud_init=box.options.cloud_init is not None,
            pool=box.options.pool,
            tags=box.options.tags,
            network=NetworkData(bridge=net.bridge, vlan=net.vlan) if (net := box.options.network) else None,
        )
        for box in boxes_for(engine, username)
    ]
    return BoxesAnswer(code=200, message="OK", data=BoxesData(boxes=boxes))
