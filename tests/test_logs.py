"""LOG_FORMAT=json: the API (plain uvicorn, as the contract starts it) and the worker (`python worker.py`),
started through dev/stack.py, log one JSON object a line, every line; the API's audit lines name who did what;
no secret is ever logged."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine

from dev.stack import FAKEPVE_PASSWORD, Stack, free_port, settings_env
from settings import Settings
from tests.factories import ALICE, BOB, auth, body
from tests.waiting import until

CREATE = "/api/v1/vm/manage/createFromBoxTemplate"


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    processes = Stack(tmp_path / "logs")
    try:
        yield processes
    finally:
        processes.stop()


def json_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of the log, each parsed as a JSON object (a line that is not one fails the test)."""
    lines = path.read_text().splitlines()
    parsed = [json.loads(line) for line in lines]
    assert all(isinstance(line, dict) for line in parsed)
    return parsed


async def test_json_logs_of_the_api_and_the_worker_with_audit_lines_and_no_secrets(
    stack: Stack, settings: Settings, engine: Engine, pve: Any
) -> None:
    env = settings_env(settings, {"LOG_FORMAT": "json", "WORKER_METRICS_PORT": "9464"})
    worker = stack.worker(env)
    api = stack.api(env, free_port())
    await worker.ready()
    await api.ready()
    # The run is admitted, then its clone fails: the worker logs the failed activity, with its run's ids.
    pve.fail("POST", "/nodes/pve1/qemu/9000/clone", error="clone_failed")
    async with httpx.AsyncClient(base_url=api.url) as http:
        created = await http.post(CREATE, json=body(), headers=auth())
        assert created.status_code == 200, created.text
        task_id = created.json()["data"]["task_id"]
        assert (await http.post(CREATE, json=body(), headers=auth("not-a-token"))).status_code == 401
        assert (await http.post(CREATE, json=body(), headers=auth(BOB))).status_code == 403
        assert (await http.get("/api/v1/vm/manage/quota", headers=auth())).status_code == 200

    await until(lambda: task_id in worker.log_path.read_text())
    api_lines = json_lines(api.log_path)
    audits = [
        {key: line.get(key) for key in ("user", "token_id", "client", "task_id", "code")}
        for line in api_lines
        if line.get("audit")
    ]
    assert [(a["user"], a["code"]) for a in audits] == [("alice", 200), (None, 401), ("bob", 403)]
    assert audits[0]["task_id"] == task_id
    assert all(a["client"] == "127.0.0.1" for a in audits)
    assert audits[0]["token_id"] and audits[2]["token_id"] and audits[0]["token_id"] != audits[2]["token_id"]
    # uvicorn's own lines are JSON too.
    assert any(line["logger"] == "uvicorn.error" for line in api_lines)

    worker_lines = json_lines(worker.log_path)
    assert any(line.get("task_id") == task_id and "temporal_activity" in line for line in worker_lines)
    for log in (api.log_path, worker.log_path):
        text = log.read_text()
        assert ALICE not in text and BOB not in text and FAKEPVE_PASSWORD not in text


def test_a_json_line_keeps_the_extras_and_leaves_out_a_librarys_own_bookkeeping() -> None:
    """The SDK puts `__temporal_error_identifier` on the records of a failed activity: not a field for a reader."""
    import logging

    from logs import JsonFormatter

    record = logging.LogRecord("worker", logging.WARNING, __file__, 1, "activity failed", None, None)
    record.__dict__.update({"__temporal_error_identifier": "ActivityError", "vmid": 101})
    line = json.loads(JsonFormatter().format(record))
    assert line["vmid"] == 101 and line["message"] == "activity failed"
    assert not [key for key in line if key.startswith("__")]
