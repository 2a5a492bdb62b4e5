"""The fuzz run: schemathesis against the API's own OpenAPI, every operation it lists, over real HTTP.

The API runs under uvicorn on the test's event loop, beside a real worker, Temporal and fakepve (the fixtures of
conftest.py), on SQLite and on PostgreSQL; schemathesis sends each case from a thread, so the loop goes on
serving while it waits. Whatever /openapi.json lists is fuzzed, with alice's token: an endpoint added later is
fuzzed without a change here (`/metrics` and the docs are not in it). Seeded, 50 cases per operation in the
fuzzing phase plus schemathesis's coverage phase (boundary values, missing and mistyped fields, undeclared
methods): reproducible in CI, 30-40 s for the whole file on 2 cores.

What must hold for every answer:
- no server error but the contract's own: 500 with a failed creation's message, 503 "Service unavailable...";
- the envelope {code, message, data} with the HTTP status equal to `code`;
- schemathesis's own checks: the documented schema of that status (response_schema_conformance: the answers
  are typed models, so it has no false failures here), an invalid request refused (negative_data_rejection), a
  405 naming what is allowed (unsupported_method). positive_data_acceptance is off: see CONFIG.
Without a valid token, every operation answers the 401 envelope.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from schemathesis import Case, CheckContext, HookContext, Response
from sqlalchemy import Engine
from temporalio.worker import Worker

from api.app import app as described_app
from api.app import create_app
from api.deps import UNAUTHORIZED
from api.idempotency import keyed_task_id
from dev.stack import HOST
from payloads import MSG_CLONE_FAILED, MSG_CONFIGURE_FAILED
from settings import Settings
from tests.factories import ALICE, BOX, auth, body

# The contract's own server errors: a creation that failed (answered with ?wait) and "try again later".
CONTRACT_500 = {MSG_CLONE_FAILED, MSG_CONFIGURE_FAILED}
UNAVAILABLE_PREFIX = "Service unavailable"
ENVELOPE_KEYS = {"code", "message", "data"}
CREATE_PATH = "/api/v1/vm/manage/createFromBoxTemplate"
LABS_PATH = "/api/v1/vm/manage/labs"
TASK_PATH = "/api/v1/vm/manage/tasks/{task_id}"
METRICS_PATH = "/metrics"
# Not a token of anyone's, a token in the wrong scheme, a scheme without a token, no header at all.
BAD_CREDENTIALS = [f"Bearer {'x' * 36}", f"Basic {ALICE}", "Bearer ", None]

CURSORS: list[Any] = [
    ["9999-12-31T23:59:59", "x"],
    ["0001-01-01T00:00:00+14:00", "x"],
    ["2026-01-01T00:00:00+00:00", "clone-\u0000"],
    ["2026-01-01", None],
    [1, 2],
    {"a": 1},
    "x",
]
SEED = 20261208
# Created under an Idempotency-Key, so that its task id is known before the run: the fuzz reads and cancels it.
STOCK_KEY = "fuzz-stock"
STOCK_TASK = keyed_task_id("alice", STOCK_KEY)


def b64json(value: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode()


# Reproducible in CI: a fixed seed, and no example database replaying what an earlier run happened to find.
GENERATION = {"max-examples": 50, "database": "none"}

CONFIG = schemathesis.Config.from_dict(
    {
        "seed": SEED,
        "generation": GENERATION,
        "headers": {"Authorization": f"Bearer {ALICE}"},
        # Random strings never name a box, a node or a VM that fits the plan; these values, often enough, take a
        # case past admission's refusals to a real creation (and, after five, to the plan's total limit).
        "dictionaries": {
            "boxes": {"values": [BOX, "box-orphan", "box-gone"]},
            "nodes": {"values": ["pve1", "pve2", "NFS"]},
            "names": {"values": ["fuzz-vm", "a", "web-01.example"]},
            "cores": {"values": [1, 2, 4]},
            "memory": {"values": [512, 2048, 8192]},
            "disk": {"values": [20, 32, 100]},
            # One key for many bodies: the repeats answer the first answer, or 422 for another body.
            "keys": {"values": ["fuzz-key-1"]},
            # The VMs of this run (PVE's lowest free VMIDs), the template, and no VMID at all.
            "vmids": {"values": ["100", "101", "102", "9000", "0", "-1", "1e3"]},
            # Listing cursors: base64 of JSON that is no cursor, of odd instants, of a NUL in the task id.
            "cursors": {"values": [b64json(value) for value in CURSORS]},
            # The stocked VM's creation (see `stocked`), ids of a run's shape, and one longer than Temporal takes.
            "task_ids": {"values": [STOCK_TASK, f"clone-{BOX}-1795742188053-4e28f4", "clone-k" + "0" * 32, "x" * 1001]},
        },
        "parameters": {
            "body.box_id": {"dictionary": "boxes", "probability": 0.7},
            "body.target": {"dictionary": "nodes", "probability": 0.7},
            "body.storage": {"dictionary": "nodes", "probability": 0.3},
            "body.name": {"dictionary": "names", "probability": 0.7},
            "body.cpuCores": {"dictionary": "cores", "probability": 0.7},
            "body.memorySize": {"dictionary": "memory", "probability": 0.7},
            "body.diskSize": {"dictionary": "disk", "probability": 0.7},
            "header.Idempotency-Key": {"dictionary": "keys", "probability": 0.3},
            "path.vmid": {"dictionary": "vmids", "probability": 0.5},
            "query.next": {"dictionary": "cursors", "probability": 0.5},
            "path.task_id": {"dictionary": "task_ids", "probability": 0.4},
        },
        "checks": {
            # Replaced by contract_server_errors below, which knows the contract's 500s and 503s.
            "not_a_server_error": {"enabled": False},
            # Valid by the schema is not admissible: the plan's limits, the nodes' names and the VM name rule are
            # the server's to judge, and its 400 then is the contract's answer.
            "positive_data_acceptance": {"enabled": False},
        },
    }
)
# The schema the API serves at /openapi.json (`served` checks that); Prometheus' text format is no envelope and
# needs no token, should /metrics ever be documented there.
SCHEMA = schemathesis.openapi.from_dict(described_app.openapi(), config=CONFIG).exclude(path=METRICS_PATH)
# Without a token only valid requests are sent: an invalid body may be refused before the token is looked at.
UNAUTHENTICATED = schemathesis.openapi.from_dict(
    described_app.openapi(),
    config=schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "generation": {**GENERATION, "mode": "positive", "max-examples": 5},
            "phases": {"coverage": {"enabled": False}},
        }
    ),
).exclude(path=METRICS_PATH)


@schemathesis.check
def contract_server_errors(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """No 5xx but the contract's: 500 with a failed creation's message, 503 'Service unavailable...'."""
    if response.status_code < 500:
        return None
    message = envelope_of(response).get("message")
    if response.status_code == 500 and message in CONTRACT_500:
        return None
    if response.status_code == 503 and isinstance(message, str) and message.startswith(UNAVAILABLE_PREFIX):
        return None
    raise AssertionError(f"Server error outside the contract: {response.status_code} {message!r}")


@schemathesis.check
def in_the_envelope(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """Every answer is {code, message, data} with the HTTP status equal to `code`."""
    answer = envelope_of(response)
    if set(answer) != ENVELOPE_KEYS:
        raise AssertionError(f"Not the envelope: keys {sorted(answer)}")
    if answer["code"] != response.status_code or not isinstance(answer["message"], str):
        raise AssertionError(f"Not the envelope: HTTP {response.status_code}, code {answer['code']!r}")
    return None


@schemathesis.hook
def before_call(context: HookContext, case: Case, kwargs: dict[str, Any]) -> None:
    """A creation that may be admitted is not waited for: its run goes on beside the fuzzing (and stops with the
    worker at the end), so that no case waits for a run's end. Changed here, in the hook, so that schemathesis
    knows the case it checks the answer against (a negative case may have been negative by its `wait` alone)."""
    if case.path == CREATE_PATH and isinstance(case.body, dict) and case.body.get("box_id") == BOX:
        case.query.pop("wait", None)


def envelope_of(response: Response) -> dict[str, Any]:
    try:
        answer = response.json()
    except ValueError as exc:
        raise AssertionError(f"Not JSON: {response.text[:200]!r}") from exc
    if not isinstance(answer, dict):
        raise AssertionError(f"Not a JSON object: {response.text[:200]!r}")
    return answer


@pytest.fixture
async def served(settings: Settings, engine: Engine, worker: Worker) -> AsyncIterator[str]:
    """The API under uvicorn on this event loop, over real HTTP: its base URL."""
    # The rate limit has tests of its own; here it would turn the end of a run into 429s.
    settings.rate_limit_per_minute = 0
    sock = socket.socket()
    sock.bind((HOST, 0))
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning", access_log=False))
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        assert not serving.done(), "uvicorn did not start"
        await asyncio.sleep(0.01)
    base_url = f"http://{HOST}:{sock.getsockname()[1]}"
    async with httpx.AsyncClient(base_url=base_url) as client:
        described = (await client.get("/openapi.json")).json()
    assert described == json.loads(json.dumps(described_app.openapi())), "the API serves another schema"
    yield base_url
    server.should_exit = True
    await serving
    sock.close()


@pytest.fixture
async def stocked(served: str) -> str:
    """`served`, where alice already has a VM (the lowest free VMID, one of CONFIG's `vmids`, made by STOCK_TASK):
    its deletion, power actions, task and listings with something in them are fuzzed too."""
    async with httpx.AsyncClient(base_url=served, timeout=60) as client:
        answer = await client.post(
            CREATE_PATH,
            params={"wait": 30},
            json=body(name="fuzz-stock"),
            headers={**auth(), "Idempotency-Key": STOCK_KEY},
        )
    assert answer.status_code == 200, answer.text
    assert answer.json()["data"]["task_id"] == STOCK_TASK
    return served


async def send(case: Case, base_url: str) -> Response:
    """Sends from a thread: the event loop goes on serving the API and running the worker meanwhile."""
    return await asyncio.to_thread(case.call, base_url=base_url)


# One stack for all of an operation's cases, on purpose: what earlier cases created is what later ones meet.
FUZZ_SETTINGS = hypothesis_settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


# PostgreSQL too: it refuses what SQLite stores (a NUL in a text), and production runs on it.
@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
@SCHEMA.parametrize()
@FUZZ_SETTINGS
async def test_every_answer_is_the_contracts(case: Case, stocked: str) -> None:
    response = await send(case, stocked)
    case.validate_response(response, transport_kwargs={"base_url": stocked})
    if case.path in (CREATE_PATH, LABS_PATH) and response.status_code == 200:
        await follow_task(response.json()["data"]["task_id"], stocked)


async def follow_task(task_id: str, base_url: str) -> None:
    """The fuzzer's own task ids are random: the state of a real run is read here, whatever step it is at."""
    follow = SCHEMA[TASK_PATH]["GET"].Case(path_parameters={"task_id": task_id}, headers=auth())
    state = await send(follow, base_url)
    follow.validate_response(state, transport_kwargs={"base_url": base_url})
    assert state.status_code == 200, state.text


@UNAUTHENTICATED.parametrize()
@FUZZ_SETTINGS
async def test_without_a_valid_token_every_operation_is_401(case: Case, served: str) -> None:
    for authorization in BAD_CREDENTIALS:
        case.headers.pop("Authorization", None)  # a CaseInsensitiveDict: whatever the schema generated
        if authorization is not None:
            case.headers["Authorization"] = authorization
        response = await send(case, served)
        assert response.status_code == 401, (authorization, response.text)
        assert response.json() == {"code": 401, "message": UNAUTHORIZED, "data": None}
