"""The FastAPI application: `uvicorn api.app:app`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

from fastapi import FastAPI
from temporalio.client import Client

from api import metrics
from api.admission import MAX_WAITERS, Waiters
from api.audit import RequestLog
from api.body_limit import BodyLimit
from api.errors import install_error_handlers
from api.metrics import ApiMetrics, RequestMetrics
from api.routes import account, labs, tasks, vm_manage, vms
from api.temporal import TemporalConnection
from db.engine import make_engine
from db.schema import require_current
from logs import configure_logging
from settings import Settings, get_settings
from temporal_client import ensure_search_attributes

log = logging.getLogger("api")


async def register_search_attributes(client: Client, namespace: str) -> None:
    """Register the search attributes runs are started with, so that creations can start before any worker has
    (the worker registers them too). Not fatal: the API may lack the operator's permission for it; the worker's
    registration then has to do."""
    try:
        await ensure_search_attributes(client, namespace)
    except Exception:
        log.warning("could not register the search attributes; the worker registers them", exc_info=True)


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app. Without `settings` (the process's own app, `uvicorn api.app:app`) it also sets the process's
    logging up from the environment, now: uvicorn logs its first lines before the lifespan starts."""
    if settings is None:
        configure_logging(Settings().log_format)

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
            client = await app.state.temporal.get()
            await register_search_attributes(client, app.state.settings.temporal_namespace)
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
    # Outside the body limit: a 413 is counted and, for a change, audited too.
    app.add_middleware(RequestLog)
    app.state.metrics = ApiMetrics()
    app.add_middleware(RequestMetrics, metrics=app.state.metrics)
    app.include_router(metrics.router)
    app.include_router(vm_manage.router)
    app.include_router(labs.router)
    app.include_router(tasks.router)
    app.include_router(vms.router)
    app.include_router(account.router)
    return app


app = create_app()
