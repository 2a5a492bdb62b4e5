"""POST /api/v1/vm/manage/createFromBoxTemplate; the task it starts is followed in api/routes/tasks.py.

Endpoints only: admission is in api/admission.py, the Idempotency-Key in api/idempotency.py.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated

from fastapi import APIRouter, Header, Query
from pydantic import AfterValidator
from sqlalchemy import Engine
from temporalio.client import Client

from api.admission import Admitter, new_task_id
from api.body_limit import MSG_BODY_TOO_LARGE
from api.deps import UNAUTHORIZED, CurrentUser, EngineDep, SettingsDep, TemporalDep, WaitersDep
from api.errors import TEMPORAL_UNAVAILABLE, ApiError, error_responses
from api.idempotency import MSG_KEY_REUSED, admit_once
from api.schemas import (
    IDEMPOTENCY_KEY_PATTERN,
    AdmissionData,
    CreateAnswer,
    CreateFromBoxRequest,
    printable_key,
    valid_vm_name,
)
from payloads import (
    MSG_BOX_NOT_FOUND,
    MSG_CLONE_FAILED,
    MSG_CONFIGURE_FAILED,
    MSG_CREATED,
    MSG_FORBIDDEN,
    MSG_INVALID_NAME,
    MSG_PER_VM_LIMIT,
    MSG_PLAN_NOT_FOUND,
    MSG_TEMPLATE_NOT_FOUND,
    MSG_TOTAL_LIMIT,
    MSG_UNAVAILABLE,
)
from settings import Settings

router = APIRouter(prefix="/api/v1/vm/manage", tags=["vm manage"])

# At most 5 minutes: a waiting request holds a connection and a Temporal long poll.
MAX_WAIT_SECONDS = 300
WaitSeconds = Annotated[float, Query(ge=0, le=MAX_WAIT_SECONDS, description="seconds to wait for the creation to end")]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        description="a retried request with the same key returns the first answer and creates nothing; "
        "1 to 255 printable ASCII characters or spaces",
        json_schema_extra={"pattern": IDEMPOTENCY_KEY_PATTERN},
    ),
    AfterValidator(printable_key),
]


def admitter_for(client: Client, engine: Engine, settings: Settings) -> Admitter:
    return Admitter(client, engine, settings.temporal_task_queue, settings.admission_timeout_seconds)


def one_of(*messages: str) -> str:
    return "; ".join(f"`{message}`" for message in messages)


@router.post(
    "/createFromBoxTemplate",
    response_description="Admitted: the VMID is fixed and the VM is being created (with ?wait: was created)",
    responses=error_responses(
        {
            400: "A body that is not valid (`Invalid request body: ...` naming the field, or the unknown "
            "field), a `wait` or `Idempotency-Key` that is not (`Invalid query parameter: ...`, `Invalid header: "
            "...`), an invalid VM name (`Invalid VM name...`), a target node, storage or diskSize that does not "
            f"fit (the message says which), or the plan's limits: {one_of(MSG_PER_VM_LIMIT, MSG_TOTAL_LIMIT)}",
            401: one_of(UNAUTHORIZED),
            403: one_of(MSG_FORBIDDEN),
            404: one_of(MSG_BOX_NOT_FOUND, MSG_TEMPLATE_NOT_FOUND, MSG_PLAN_NOT_FOUND),
            413: one_of(MSG_BODY_TOO_LARGE),
            422: one_of(MSG_KEY_REUSED),
            500: f"The creation failed (with ?wait): {one_of(MSG_CLONE_FAILED, MSG_CONFIGURE_FAILED)}",
            503: f"{one_of(MSG_UNAVAILABLE)} (nor ever will be, for this request); {one_of(TEMPORAL_UNAVAILABLE)}",
        }
    ),
)
async def create_from_box_template(
    body: CreateFromBoxRequest,
    username: CurrentUser,
    settings: SettingsDep,
    client: TemporalDep,
    engine: EngineDep,
    waiters: WaitersDep,
    wait: WaitSeconds = 0,
    idempotency_key: IdempotencyKey = None,
) -> CreateAnswer:
    if not valid_vm_name(body.name):
        raise ApiError(400, MSG_INVALID_NAME)
    input = body.to_input(username, settings.default_storage)
    admitter = admitter_for(client, engine, settings)
    if idempotency_key is None:
        admission = await admitter.admit(new_task_id(body.box_id), input)
    else:
        admission = await admit_once(admitter, username, idempotency_key, input)
    if wait and (made := await admitter.wait_for_end(admission.task_id, wait, waiters)) is not None:
        admission = dataclasses.replace(admission, vmid=made.vmid)  # where the VM is, if a collision moved it
    return CreateAnswer(code=200, message=MSG_CREATED, data=AdmissionData.of(admission))
