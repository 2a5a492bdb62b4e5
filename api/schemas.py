"""Request and response bodies of the REST API (the seed's field names, snake_case in Python)."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

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


def valid_vm_name(name: str) -> bool:
    return VM_NAME.match(name) is not None


class Envelope(BaseModel):
    code: int
    message: str
    data: Any = None
