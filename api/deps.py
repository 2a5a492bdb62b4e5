"""Dependencies shared by the routes: settings, database engine, Temporal client, the current user and the
task of the path that is theirs."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy import Engine
from temporalio.client import Client

from api.errors import TEMPORAL_UNAVAILABLE, ApiError
from api.task_state import Task, owned_task
from db.tokens import username_for
from settings import Settings

UNAUTHORIZED = "Missing or invalid Bearer token"


def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def get_engine(request: Request) -> Engine:
    return request.app.state.engine  # type: ignore[no-any-return]


async def get_temporal(request: Request) -> Client:
    """The app's Temporal client, connecting now if the server was down when the app started."""
    try:
        return await request.app.state.temporal.get()  # type: ignore[no-any-return]
    except Exception as exc:
        raise ApiError(503, TEMPORAL_UNAVAILABLE) from exc


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
EngineDep = Annotated[Engine, Depends(get_engine)]
TemporalDep = Annotated[Client, Depends(get_temporal)]


def current_user(engine: EngineDep, authorization: Annotated[str | None, Header()] = None) -> str:
    """The user whose session Bearer token came with the request; 401 otherwise."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, UNAUTHORIZED)
    username = username_for(engine, token.strip())
    if username is None:
        raise ApiError(401, UNAUTHORIZED)
    return username


CurrentUser = Annotated[str, Depends(current_user)]


async def get_owned_task(task_id: str, username: CurrentUser, client: TemporalDep) -> Task:
    """The task named in the path, if the caller started it; 404 otherwise."""
    return await owned_task(client, task_id, username)


OwnedTask = Annotated[Task, Depends(get_owned_task)]
