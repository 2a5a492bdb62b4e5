"""Dependencies shared by the routes: settings, database engine, Temporal client, the caller (authenticated,
then counted against the rate limit), the current user and the task of the path that is theirs."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy import Engine
from temporalio.client import Client

from api.admission import Waiters
from api.auth import CHALLENGE, bearer_caller
from api.auth import UNAUTHORIZED as UNAUTHORIZED  # re-exported: the routes document it
from api.errors import TEMPORAL_UNAVAILABLE, ApiError
from api.task_state import Task, owned_task
from db.rate_limits import count_request
from db.tokens import Caller
from logs import bind
from settings import Settings

RATE_LIMITED = "Too many requests: at most {limit} requests a minute per token"


# Dependencies that only read the app's state are `async def`: FastAPI would run a plain `def` on its thread pool,
# a hand-off to a thread and back for each of them on every request.


async def get_settings_dep(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


async def get_engine(request: Request) -> Engine:
    return request.app.state.engine  # type: ignore[no-any-return]


async def get_temporal(request: Request) -> Client:
    """The app's Temporal client, connecting now if the server was down when the app started."""
    try:
        return await request.app.state.temporal.get()  # type: ignore[no-any-return]
    except Exception as exc:
        raise ApiError(503, TEMPORAL_UNAVAILABLE) from exc


async def get_waiters(request: Request) -> Waiters:
    return request.app.state.waiters  # type: ignore[no-any-return]


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
WaitersDep = Annotated[Waiters, Depends(get_waiters)]
EngineDep = Annotated[Engine, Depends(get_engine)]
TemporalDep = Annotated[Client, Depends(get_temporal)]


def current_caller(
    request: Request, engine: EngineDep, settings: SettingsDep, authorization: Annotated[str | None, Header()] = None
) -> Caller:
    """The user and token of the request's session Bearer token (401 for none, or one unknown, expired or
    revoked), after counting the request against the token's rate limit (429 past it).

    A plain `def`: FastAPI runs it on its thread pool, so the database round trips never block the event loop.
    The caller is also left on `request.state.caller`, for what reports on a refused request (audit lines), and
    bound to the request's log context."""
    caller = bearer_caller(engine, authorization)
    if caller is None:
        raise ApiError(401, UNAUTHORIZED, CHALLENGE)
    request.state.caller = caller
    bind(user=caller.username)
    limit = settings.rate_limit_per_minute
    if limit:
        retry_after = count_request(engine, caller.token_hash, limit)
        if retry_after is not None:
            raise ApiError(429, RATE_LIMITED.format(limit=limit), headers={"Retry-After": str(retry_after)})
    return caller


CurrentCaller = Annotated[Caller, Depends(current_caller)]


async def current_user(caller: CurrentCaller) -> str:
    """The caller's username, what the routes act for. FastAPI resolves `current_caller` once per request, so a
    route that takes both counts one request. Async: no thread is needed to read an attribute."""
    return caller.username


CurrentUser = Annotated[str, Depends(current_user)]


async def get_owned_task(task_id: str, username: CurrentUser, client: TemporalDep) -> Task:
    """The task named in the path, if the caller started it; 404 otherwise."""
    bind(task_id=task_id)
    return await owned_task(client, task_id, username)


OwnedTask = Annotated[Task, Depends(get_owned_task)]
