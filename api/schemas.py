"""Request and response bodies of the REST API (the seed's field names, snake_case in Python).

Every answer is the envelope {code, message, data}; each endpoint's success answer names its `data` model, so
that /openapi.json documents every field, and errors are the envelope with `data` null. Field order here is
the order of the keys in the JSON answered.
"""

from __future__ import annotations

import re
from typing import Annotated, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from payloads import Admission, CreateFromBoxInput

PositiveInt = Annotated[StrictInt, Field(gt=0, le=2**31 - 1)]
NonEmpty = Annotated[StrictStr, Field(min_length=1, max_length=255)]

# PVE's rule for VM names (format `dns-name`): dot-separated labels of letters, digits and hyphens that start
# and end with a letter or digit.
VM_NAME = re.compile(
    r"^(?=.{1,128}$)[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*$"
)


class CreateFromBoxRequest(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    box_id: NonEmpty
    name: StrictStr
    target: NonEmpty
    cpu_cores: PositiveInt = Field(alias="cpuCores")
    memory_mb: PositiveInt = Field(alias="memorySize")
    disk_gb: PositiveInt = Field(alias="diskSize")
    storage: NonEmpty | None = None

    def to_input(self, username: str, default_storage: str) -> CreateFromBoxInput:
        return CreateFromBoxInput(
            username=username,
            box_id=self.box_id,
            name=self.name,
            target=self.target,
            cpu_cores=self.cpu_cores,
            memory_mb=self.memory_mb,
            disk_gb=self.disk_gb,
            storage=self.storage or default_storage,
        )


def valid_vm_name(name: str) -> bool:
    return VM_NAME.match(name) is not None


# ------------------------------------------------------------------------------ answers

DataT = TypeVar("DataT")
TaskStatus = Literal["running", "succeeded", "failed", "cancelled"]


class Envelope(BaseModel, Generic[DataT]):
    code: int = Field(description="the HTTP status of the answer")
    message: str
    data: DataT


class AdmissionData(BaseModel):
    task_id: str = Field(description="the Temporal workflow id of the run; GET tasks/{task_id} follows it")
    vm_name: str
    vmid: str = Field(description="the VMID the new VM has on PVE", examples=["106"])

    @classmethod
    def of(cls, admission: Admission) -> AdmissionData:
        return cls(task_id=admission.task_id, vm_name=admission.vm_name, vmid=str(admission.vmid))


class TaskStateData(BaseModel):
    task_id: str
    status: TaskStatus
    step: str = Field(description="admission, clone, configure, cleanup or done")
    vmid: str | None = Field(description="known once the request is admitted", examples=["106"])
    vm_name: str
    node: str
    result_code: int | None = Field(description="once ended: what a synchronous call would have answered")
    result_message: str | None
    started_at: str | None = Field(description="UTC, to the second", examples=["2026-11-27T10:00:00Z"])
    finished_at: str | None = Field(description="null while the run goes on")


class CreateAnswer(Envelope[AdmissionData]):
    """The request is admitted: the VM is being created under `data.task_id` (or, with ?wait, was created)."""


class TaskAnswer(Envelope[TaskStateData]):
    """The state of a creation."""


class ErrorAnswer(Envelope[None]):
    """A refusal or a failure: `message` says which, in the seed's words."""
