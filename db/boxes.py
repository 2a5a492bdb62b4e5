"""Which template a user gets from a box: the three checks that need no PVE (box, template record, permission),
in the contract's order. Written once, used twice: the API answers these refusals without starting a run, and
admission checks them again for runs that no API stands in front of (child workflows, resets)."""

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, Select, and_, bindparam, select

from db.box_options import BoxSettings
from db.engine import reader, table_of
from db.models import Box, Template, TemplateUser
from db.quota import Refused
from payloads import MSG_BOX_NOT_FOUND, MSG_FORBIDDEN, MSG_TEMPLATE_NOT_FOUND, Failure


@dataclass(frozen=True)
class TemplateVm:
    node: str
    vmid: int
    box: BoxSettings = field(default_factory=BoxSettings)  # what makes the VM ready to use


def template_for(engine: Engine, username: str, box_id: str) -> TemplateVm:
    """The box's template VM and the box's options, if `username` may use it; Refused (box 404, template 404,
    permission 403) otherwise. One statement (both the API and every admission ask, on the POST's path)."""
    if "\x00" in box_id:
        # No box can have this id, and PostgreSQL refuses the string outright (an error the caller would
        # retry until its deadline): answer what it is.
        raise Refused(Failure.BOX_NOT_FOUND, MSG_BOX_NOT_FOUND)
    with reader(engine).connect() as db:
        row = db.execute(_TEMPLATE_FOR, {"box_id": box_id, "username": username}).first()
    if row is None:
        raise Refused(Failure.BOX_NOT_FOUND, MSG_BOX_NOT_FOUND)
    if row.node is None:
        raise Refused(Failure.TEMPLATE_NOT_FOUND, MSG_TEMPLATE_NOT_FOUND)
    if not row.public and row.allowed is None:
        raise Refused(Failure.FORBIDDEN, MSG_FORBIDDEN)
    return TemplateVm(node=row.node, vmid=row.vmid, box=BoxSettings.of(row))


def _template_for_statement() -> Select[Any]:
    box, template, allowed = table_of(Box), table_of(Template), table_of(TemplateUser)
    return (
        select(
            *(box.c[name] for name in BOX_OPTIONS),
            template.c.node,
            template.c.vmid,
            template.c.public,
            allowed.c.username.label("allowed"),
        )
        .select_from(box)
        .outerjoin(template, template.c.id == box.c.template_id)
        .outerjoin(
            allowed,
            and_(allowed.c.template_id == template.c.id, allowed.c.username == bindparam("username")),
        )
        .where(box.c.id == bindparam("box_id"))
    )


# The box's columns that BoxSettings reads.
BOX_OPTIONS = ("start", "wait_for_ip_seconds", "cloud_init", "pool", "tags", "network")
_TEMPLATE_FOR = _template_for_statement()
