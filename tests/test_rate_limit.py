"""RATE_LIMIT_PER_MINUTE: each token's authenticated requests a minute, counted in the database so that every
API process shares one count; past it 429 in the envelope with Retry-After."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine
from sqlmodel import select

from api.app import create_app
from api.deps import RATE_LIMITED
from db.engine import make_engine, session
from db.models import RateLimitWindow
from db.rate_limits import count_request
from db.schema import upgrade
from settings import Settings
from tests.factories import ALICE, BOB, auth

UNKNOWN_TASK = "/api/v1/vm/manage/tasks/clone-no-such-task"
BOTH_DATABASES = pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)


@asynccontextmanager
async def api_process(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """One more API app on the same database, as another `uvicorn` process would be."""
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as client,
    ):
        yield client


def a_fresh_minute() -> None:
    """Start in the first 50 seconds of a minute, so that a test's few requests all fall in one window."""
    if time.time() % 60 > 50:
        time.sleep(60.5 - time.time() % 60)


async def statuses(api: httpx.AsyncClient, count: int, token: str = ALICE) -> list[int]:
    return [(await api.get(UNKNOWN_TASK, headers=auth(token))).status_code for _ in range(count)]


def assert_rate_limited(response: httpx.Response, limit: int) -> None:
    assert response.status_code == 429
    assert response.json() == {"code": 429, "message": RATE_LIMITED.format(limit=limit), "data": None}
    assert 1 <= int(response.headers["Retry-After"]) <= 60


@BOTH_DATABASES
async def test_past_the_limit_a_token_gets_429_with_retry_after_from_every_api_process(
    settings: Settings, engine: Engine
) -> None:
    settings.rate_limit_per_minute = 3
    a_fresh_minute()
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(api_process(settings))
        second = await stack.enter_async_context(api_process(settings))
        # 404: the token was accepted and the request counted; the task is unknown.
        assert await statuses(first, 2) + await statuses(second, 1) == [404, 404, 404]
        assert_rate_limited(await second.get(UNKNOWN_TASK, headers=auth(ALICE)), 3)
        assert_rate_limited(await first.get(UNKNOWN_TASK, headers=auth(ALICE)), 3)
        assert await statuses(first, 1, BOB) == [404]  # per token: bob's count is his own
        # Refused before authentication: no token is known to count against.
        assert (await first.get(UNKNOWN_TASK, headers=auth("x" * 40))).status_code == 401


async def test_limit_0_is_off(settings: Settings, engine: Engine) -> None:
    settings.rate_limit_per_minute = 0
    async with api_process(settings) as api:
        assert set(await statuses(api, 5)) == {404}
    with session(engine) as db:
        assert db.exec(select(RateLimitWindow)).all() == []


def test_the_default_is_600() -> None:
    assert Settings(_env_file=None).rate_limit_per_minute == 600  # type: ignore[call-arg]


# ------------------------------------------------------------------------------ the counter itself


@pytest.fixture
def db(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    upgrade(engine)
    yield engine
    engine.dispose()


MINUTE = 29_000_000  # a Unix minute, in 2025


@BOTH_DATABASES
def test_retry_after_is_the_rest_of_the_minute_and_old_windows_are_deleted(db: Engine) -> None:
    start = MINUTE * 60
    assert [count_request(db, "h1", 2, start + s) for s in (0, 10, 15.2)] == [None, None, 45]
    assert count_request(db, "h1", 2, start + 59.9) == 1  # never 0: that would invite a retry at once
    assert count_request(db, "h2", 2, start + 1) is None  # another token's window

    # The first request of a new minute starts a new count and deletes that token's older windows.
    assert count_request(db, "h1", 2, start + 60) is None
    with session(db) as s:
        windows = {(w.token_hash, w.minute): w.count for w in s.exec(select(RateLimitWindow)).all()}
    assert windows == {("h1", MINUTE + 1): 1, ("h2", MINUTE): 1}


@BOTH_DATABASES
def test_concurrent_requests_are_each_counted_once(db: Engine) -> None:
    now = MINUTE * 60 + 5.0
    with ThreadPoolExecutor(max_workers=8) as pool:
        verdicts = list(pool.map(lambda _: count_request(db, "h", 50, now), range(80)))
    assert verdicts.count(None) == 50
    with session(db) as s:
        window = s.get(RateLimitWindow, ("h", MINUTE))
    assert window is not None and window.count == 80


def test_the_counts_skip_the_fsync_but_leave_the_pooled_connection_fully_durable(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path}/app.db")
    upgrade(engine)
    try:
        count_request(engine, "h", 10)
        with engine.connect() as connection:  # the same pooled connection
            raw = connection.connection.dbapi_connection
            assert raw is not None and raw.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        engine.dispose()
