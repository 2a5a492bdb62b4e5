"""What a user has to work with: their plan and how much of it is used (GET quota), and the boxes they may use
(GET boxes). Read-only."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Engine
from sqlmodel import col, or_, select

from db.box_options import BoxSettings
from db.engine import session
from db.models import Box, Plan, Template, TemplateUser, User
from db.quota import Refused, Usage, usage_of
from payloads import MSG_PLAN_NOT_FOUND, Failure


@dataclass(frozen=True)
class Quota:
    plan: Plan
    used: Usage


def quota_of(engine: Engine, username: str) -> Quota:
    """The user's plan and what counts against it, by the arithmetic admission uses (db.quota.usage_of);
    Refused (plan not found) for a user without a plan, or whose plan is not defined."""
    with session(engine) as db:
        user = db.get(User, username)
        plan = db.get(Plan, user.plan_id) if user is not None and user.plan_id else None
        if plan is None:
            raise Refused(Failure.PLAN_NOT_FOUND, MSG_PLAN_NOT_FOUND)
        return Quota(plan=plan, used=usage_of(db, username))


@dataclass(frozen=True)
class UsableBox:
    id: str
    name: str
    template_name: str
    options: BoxSettings


def boxes_for(engine: Engine, username: str) -> list[UsableBox]:
    """The boxes whose template is public or allows the user, by id. A box whose template is not defined is
    nobody's to use (it answers 404), so it is not listed."""
    allowed = select(TemplateUser.template_id).where(TemplateUser.username == username)
    query = (
        select(Box, Template)
        .join(Template, col(Template.id) == col(Box.template_id))
        .where(or_(col(Template.public).is_(True), col(Template.id).in_(allowed)))
        .order_by(col(Box.id))
    )
    with session(engine) as db:
        return [
            UsableBox(id=box.id, name=box.name, template_name=template.name, options=BoxSettings.of(box))
            for box, template in db.exec(query)
        ]
