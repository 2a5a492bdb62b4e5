"""The FastAPI application: `uvicorn api.app:app`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

from fastapi import FastAPI

from api.admission import MAX_WAITERS, Waiters
from api.body_limit import BodyLimit
from api.errors import install_error_handlers
from api.routes import account, tasks, vm_manage, vms
from api.temporal import TemporalConnection
from db.engine import make_engine
from db.schema import require_current
from settings import Settings, get_settings

log = logging.getLogger("api")


def create_app(settings: Settings | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings or get_settings()
        app.state.engine = make_engine(app.state.settings.database_url)
        # Once, at start: an API on tables of another schema version would fail requests instead (SchemaError,
        # naming what to run, ends the startup).
        require_current(app.state.engine)
        app.state.temporal = TemporalConnection(app.state.settings)
        app.state.waiters = Waiters(MAX_WAITERS)
        # Connect early so the first request is fast; a server that is down now is retried per request.
        with suppress(Exception):
            await app.state.temporal.get()
        yield
        app.state.engine.dispose()

    app = FastAPI(
        title="PVE Boxes",
        description="Create Proxmox VE VMs from Box templates, durably, on Temporal.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    # Outside the routes, so that an oversized body is refused before the token is looked at.
    app.add_middleware(BodyLimit)
    app.include_router(vm_manage.router)
    app.include_router(tasks.router)
    app.include_router(vms.router)
    app.include_router(account.router)
    return app


app = create_app()
