"""Bad input and limits, tried as an outsider would (issue 8, findings 4, 5 and 7): each is refused at the door,
fast, in the envelope, and leaves nothing behind: no workflow run, no reservation, nothing on PVE."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import Request
from sqlalchemy import Engine
from temporalio.client import Client, WorkflowHandle
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from activities.db import DbActivities
from api.app import create_app
from api.deps import get_temporal
from api.errors import DATABASE_UNAVAILABLE
from db.clone_slots import Limits
from db.engine import make_engine
from payloads import MSG_BOX_NOT_FOUND, MSG_CREATED, MSG_FORBIDDEN, MSG_TEMPLATE_NOT_FOUND
from settings import Settings
from tests.api.test_vm_manage import CREATE, INVALID_NAME_PREFIX, assert_nothing_left
from tests.conftest import created_vms, result_of
from tests.factories import ALICE, BOB, auth, body

pytestmark = pytest.mark.usefixtures("worker")

BODY_TOO_LARGE = {"code": 413, "message": "Request body too large (at most 65536 bytes)", "data": None}
KEY_MESSAGE = "Invalid header: 'Idempotency-Key' must be 1 to 255 printable ASCII characters or spaces"
BOTH_DATABASES = pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)


async def assert_no_run_started(temporal: Client, settings: Settings) -> None:
    """No workflow run was ever started on the test's task queue. Visibility lags the start by some
    milliseconds, so look a few times."""
    for _ in range(4):
        runs = [run.id async for run in temporal.list_workflows(f'TaskQueue = "{settings.temporal_task_queue}"')]
        assert runs == []
        await asyncio.sleep(0.15)


async def assert_refused(
    response: httpx.Response, status: int, message: str, temporal: Client, settings: Settings, pve: Any, engine: Engine
) -> None:
    assert response.status_code == status, response.text
    assert response.json() == {"code": status, "message": message, "data": None}
    assert_nothing_left(pve, engine)
    await assert_no_run_started(temporal, settings)


# ------------------------------------------------------------------------------ the body


async def test_a_name_ending_in_a_newline_is_an_invalid_name(
    api: httpx.AsyncClient, temporal: Client, settings: Settings, pve: Any, engine: Engine
) -> None:
    for name in ("web-01\n", "web-01\r\n", "web\n01"):
        response = await api.post(CREATE, json=body(name=name), headers=auth())
        assert response.status_code == 400, (name, response.text)
        assert response.json()["message"].startswith(INVALID_NAME_PREFIX)
    assert_nothing_left(pve, engine)
    await assert_no_run_started(temporal, settings)


@BOTH_DATABASES
@pytest.mark.parametrize("field", ["box_id", "target", "storage"])
@pytest.mark.parametrize("bad", ["\x00", "\n", "\x1b[31m", "\x7f", "\x85"], ids=["nul", "lf", "esc", "del", "nel"])
async def test_control_characters_in_ids_are_refused_at_once(
    api: httpx.AsyncClient,
    temporal: Client,
    settings: Settings,
    pve: Any,
    engine: Engine,
    field: str,
    bad: str,
) -> None:
    value = {"box_id": body()["box_id"], "target": "pve2", "storage": "NFS"}[field]
    started = time.monotonic()
    response = await api.post(CREATE, json=body(**{field: value + bad}), headers=auth())
    assert time.monotonic() - started < 2  # a NUL on PostgreSQL used to end as a 503 after the admission timeout
    message = f"Invalid request body: '{field}' must not contain control characters"
    await assert_refused(response, 400, message, temporal, settings, pve, engine)


@pytest.mark.parametrize(
    ("overrides", "unknown"),
    [
        ({"storge": "fast"}, "storge"),
        ({"cpu_cores": 2, "cpuCores": ...}, "cpu_cores"),
        ({"memory_mb": 2048, "memorySize": ...}, "memory_mb"),
        ({"disk_gb": 20, "diskSize": ...}, "disk_gb"),
        # A snake_case twin beside its camelCase field is unknown too, not an alias that might win.
        ({"cpu_cores": 4}, "cpu_cores"),
        ({"boxId": "x"}, "boxId"),
    ],
)
async def test_unknown_fields_are_a_400_naming_them(
    api: httpx.AsyncClient,
    temporal: Client,
    settings: Settings,
    pve: Any,
    engine: Engine,
    overrides: dict[str, Any],
    unknown: str,
) -> None:
    response = await api.post(CREATE, json=body(**overrides), headers=auth())
    message = f"Invalid request body: unknown field '{unknown}'"
    await assert_refused(response, 400, message, temporal, settings, pve, engine)


# ------------------------------------------------------------------------ query and headers


@pytest.mark.parametrize(
    ("wait", "message"),
    [
        ("301", "Invalid query parameter: 'wait' must be at most 300"),
        ("3600", "Invalid query parameter: 'wait' must be at most 300"),
        ("inf", "Invalid query parameter: 'wait' must be at most 300"),
        ("-1", "Invalid query parameter: 'wait' must be at least 0"),
        ("soon", "Invalid query parameter: 'wait' must be a number"),
    ],
)
async def test_wait_is_at_most_300_seconds(
    api: httpx.AsyncClient,
    temporal: Client,
    settings: Settings,
    pve: Any,
    engine: Engine,
    wait: str,
    message: str,
) -> None:
    response = await api.post(CREATE, params={"wait": wait}, json=body(), headers=auth())
    await assert_refused(response, 400, message, temporal, settings, pve, engine)


async def test_wait_of_300_is_accepted(api: httpx.AsyncClient, pve: Any) -> None:
    response = await api.post(CREATE, params={"wait": "300"}, json=body(), headers=auth())
    assert (response.status_code, response.json()["message"]) == (200, MSG_CREATED)
    assert len(created_vms(pve)) == 1


@pytest.mark.parametrize(
    "key",
    [b"", b"x" * 256, b"tab\tinside", b"nul\x00inside", b"del\x7f", "\u00fcmlaut".encode(), b"\xff"],
    ids=["empty", "256-long", "tab", "nul", "del", "utf8", "latin1"],
)
async def test_idempotency_key_is_printable_ascii(
    api: httpx.AsyncClient, temporal: Client, settings: Settings, pve: Any, engine: Engine, key: bytes
) -> None:
    # Raw bytes: httpx itself would refuse to send some of these as text.
    headers = [(b"authorization", f"Bearer {ALICE}".encode()), (b"idempotency-key", key)]
    response = await api.post(CREATE, json=body(), headers=headers)
    await assert_refused(response, 400, KEY_MESSAGE, temporal, settings, pve, engine)


async def test_idempotency_key_of_visible_ascii_and_spaces_works(api: httpx.AsyncClient, temporal: Client) -> None:
    key = "order 42/~!#" + "k" * 243
    assert len(key) == 255
    first = await api.post(CREATE, json=body(), headers={**auth(), "Idempotency-Key": key})
    again = await api.post(CREATE, json=body(), headers={**auth(), "Idempotency-Key": key})
    assert first.status_code == 200, first.text
    assert again.json() == first.json()
    await result_of(temporal, first.json()["data"]["task_id"])


# ---------------------------------------------------------------------------- body size


async def test_a_body_over_64_kib_is_a_413_before_the_token_is_looked_at(
    api: httpx.AsyncClient, temporal: Client, settings: Settings, pve: Any, engine: Engine
) -> None:
    big = json.dumps(body(name="x" * 70 * 1024)).encode()
    for headers in ({}, {"Authorization": "Bearer nonsense"}, auth()):
        response = await api.post(CREATE, content=big, headers={**headers, "Content-Type": "application/json"})
        assert (response.status_code, response.json()) == (413, BODY_TOO_LARGE)
    # Any path, any method: the limit stands in front of routing too.
    response = await api.request("GET", "/api/v1/vm/manage/tasks/x", content=big)
    assert (response.status_code, response.json()) == (413, BODY_TOO_LARGE)
    assert_nothing_left(pve, engine)
    await assert_no_run_started(temporal, settings)


async def test_a_body_of_exactly_64_kib_is_read(api: httpx.AsyncClient) -> None:
    request = json.dumps(body(box_id="no-such-box")).encode()
    padded = request + b" " * (64 * 1024 - len(request))
    response = await api.post(CREATE, content=padded, headers={**auth(), "Content-Type": "application/json"})
    assert (response.status_code, response.json()["message"]) == (404, MSG_BOX_NOT_FOUND)
    response = await api.post(CREATE, content=padded + b" ", headers={**auth(), "Content-Type": "application/json"})
    assert response.status_code == 413


class Chunks:
    """A request body of `count` chunks of 1 KiB, streamed; counts how many the server pulled."""

    def __init__(self, count: int):
        self.count = count
        self.pulled = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(self.count):
            self.pulled += 1
            yield b" " * 1024


@pytest.mark.parametrize("token", [None, ALICE], ids=["no-token", "token"])
async def test_a_chunked_body_is_cut_off_once_past_64_kib(
    api: httpx.AsyncClient, temporal: Client, settings: Settings, token: str | None
) -> None:
    chunks = Chunks(1000)  # 1 MiB, without a Content-Length
    headers = {"Content-Type": "application/json", **(auth(token) if token else {})}
    response = await api.post(CREATE, content=chunks, headers=headers)
    assert "content-length" not in response.request.headers
    assert (response.status_code, response.json()) == (413, BODY_TOO_LARGE)
    assert chunks.pulled <= 65  # read up to the limit, not whole
    await assert_no_run_started(temporal, settings)


async def test_a_declared_oversize_body_is_not_read_at_all(api: httpx.AsyncClient) -> None:
    chunks = Chunks(70)
    headers = {"Content-Type": "application/json", "Content-Length": str(70 * 1024)}
    response = await api.post(CREATE, content=chunks, headers=headers)
    assert (response.status_code, response.json()) == (413, BODY_TOO_LARGE)
    assert chunks.pulled == 0


# ------------------------------------------------------------- refusals without a workflow run


@pytest.mark.parametrize(
    ("overrides", "token", "status", "message"),
    [
        ({"box_id": "no-such-box"}, ALICE, 404, MSG_BOX_NOT_FOUND),
        ({"box_id": "box-orphan"}, ALICE, 404, MSG_TEMPLATE_NOT_FOUND),
        ({}, BOB, 403, MSG_FORBIDDEN),
        # The order of the checks is kept: the box before the template, the template before the permission.
        ({"box_id": "no-such-box"}, BOB, 404, MSG_BOX_NOT_FOUND),
        ({"box_id": "box-orphan"}, BOB, 404, MSG_TEMPLATE_NOT_FOUND),
    ],
)
async def test_refusals_that_need_no_pve_start_no_run(
    api: httpx.AsyncClient,
    temporal: Client,
    settings: Settings,
    pve: Any,
    engine: Engine,
    overrides: dict[str, Any],
    token: str,
    status: int,
    message: str,
) -> None:
    for key in (None, "retry-1"):
        headers = auth(token) | ({"Idempotency-Key": key} if key else {})
        response = await api.post(CREATE, json=body(**overrides), headers=headers)
        await assert_refused(response, status, message, temporal, settings, pve, engine)
    # Nor was PVE asked anything.
    assert [r for r in pve.requests if "/access/ticket" not in r[1]] == []


@BOTH_DATABASES
def test_a_nul_in_a_box_id_is_no_box_for_runs_started_by_others(engine: Engine) -> None:
    """A child workflow has no API in front of it: admission's own check answers "Box not found", not an error
    that PostgreSQL raises and the activity retries until the admission deadline."""
    db = DbActivities(engine, Limits(per_node=0, per_storage=0), tell_slot_granted=_never_called)
    with pytest.raises(ApplicationError) as refused:
        db.template_of("alice", "60d5ec49f1b2c8a1e4d3b2a1\x00")
    assert (refused.value.type, refused.value.message) == ("BoxNotFound", MSG_BOX_NOT_FOUND)


async def _never_called(task_id: str) -> bool:
    raise AssertionError(task_id)


# ----------------------------------------------------------------------- ?wait after admission


class ResultUnreachable:
    """The API's Temporal client, except that a run's end cannot be learnt: `result()` fails as it does when
    the server stops answering after the admission."""

    def __init__(self, client: Client):
        self._client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def get_workflow_handle(self, workflow_id: str, **kwargs: Any) -> WorkflowHandle[Any, Any]:
        handle = self._client.get_workflow_handle(workflow_id, **kwargs)

        async def unreachable(*_args: Any, **_kwargs: Any) -> Any:
            raise RPCError("connection refused", RPCStatusCode.UNAVAILABLE, b"")

        handle.result = unreachable  # type: ignore[method-assign]
        return handle


async def test_wait_answers_the_admission_when_the_end_cannot_be_learnt(
    settings: Settings, temporal: Client, pve: Any
) -> None:
    app = create_app(settings)

    async def temporal_that_loses_results(request: Request) -> Any:
        return ResultUnreachable(await get_temporal(request))

    app.dependency_overrides[get_temporal] = temporal_that_loses_results
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as api,
    ):
        response = await api.post(CREATE + "?wait=30", json=body(), headers=auth())
    assert response.status_code == 200, response.text
    answer = response.json()
    assert (answer["code"], answer["message"]) == (200, MSG_CREATED)
    assert answer["data"]["vmid"] == "100" and answer["data"]["vm_name"] == "my-new-vm-from-box"
    # The run goes on and makes the VM: a 5xx here would have invited a retry, and a second VM.
    result = await result_of(temporal, answer["data"]["task_id"])
    assert result.vmid == 100
    assert [vm.vmid for vm in created_vms(pve)] == [100]


@pytest.mark.fakepve(time_scale=1)
async def test_past_the_cap_on_waiters_a_wait_answers_at_once(settings: Settings, temporal: Client, pve: Any) -> None:
    """Each ?wait holds a connection and a poll on Temporal: past the process's cap, answer as without wait."""
    pve.ceph_slow(3)  # every clone takes 3 s: a waiter would hold on that long
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as api,
    ):
        app.state.waiters.cap = 0
        response = await api.post(CREATE + "?wait=30", json=body(), headers=auth())
        assert response.status_code == 200, response.text
        task_id = response.json()["data"]["task_id"]
        # Answered with the admission while the run still goes on.
        description = await temporal.get_workflow_handle(task_id).describe()
        assert description.close_time is None
    assert (await result_of(temporal, task_id)).vmid == 100


async def test_a_method_a_route_does_not_take_is_405_with_allow_in_the_envelope(api: httpx.AsyncClient) -> None:
    # Found by the fuzz run: HTTP requires `Allow` on a 405, and the envelope handler dropped it.
    response = await api.request("PUT", "/api/v1/vm/manage/tasks/x", headers=auth())
    assert (response.status_code, response.json()["code"]) == (405, 405)
    assert response.headers["allow"] == "GET"


async def test_a_database_that_cannot_be_reached_is_a_503_not_a_500(settings: Settings) -> None:
    # The contract's 503 is for the server's trouble that may clear; a bare 500 is outside the documented answers.
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as api,
    ):
        app.state.engine = make_engine("postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=2")
        for response in (
            await api.post(CREATE, json=body(), headers=auth()),
            await api.get("/api/v1/vm/manage/vms", headers=auth()),
        ):
            assert response.status_code == 503, response.text
            assert response.json() == {"code": 503, "message": DATABASE_UNAVAILABLE, "data": None}
