"""Which template a user gets from a box: the three checks that need no PVE (box, template record, permission),
in the contract's order. Written once, used twice: the API answers these refusals without starting a run, and
admission checks them again for runs that no API stands in front of (child workflows, resets)."""

from dataclasses import dataclass, field

from sqlalchemy import Engine

from db.box_options import BoxSettings
from db.engine import reader, session
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
    permission 403) otherwise."""
    if "\x00" in box_id:
        # No box can have this id, and PostgreSQL refuses the string outright (an error the caller would
        # retry until its deadline): answer what it is.
        raise Refused(Failure.BOX_NOT_FOUND, MSG_BOX_NOT_FOUND)
    with session(reader(engine)) as db:
        box = db.get(Box, box_id)
        if box is None:
            raise Refused(Failure.BOX_NOT_FOUND, MSG_BOX_NOT_FOUND)
        template = db.get(Template, box.template_id)
        if template is None:
            raise Refused(Failure.TEMPLATE_NOT_FOUND, MSG_TEMPLATE_NOT_FOUND)
        if not template.public and db.get(TemplateUser, (template.id, username)) is None:
            raise Refused(Failure.FORBIDDEN, MSG_FORBIDDEN)
        return TemplateVm(node=template.node, vmid=template.vmid, box=BoxSettings.of(box))
