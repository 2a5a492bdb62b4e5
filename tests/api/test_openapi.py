"""/openapi.json documents every answer of the two endpoints: the envelope with a typed `data` for the 200,
`data` null for every error, and exactly the fields the endpoints answer."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from temporalio.client import Client

from api.app import create_app
from tests.conftest import result_of
from tests.factories import auth, body

CREATE = ("/api/v1/vm/manage/createFromBoxTemplate", "post")
TASK = ("/api/v1/vm/manage/tasks/{task_id}", "get")
JSON_TYPES = {"string": str, "integer": int, "null": type(None), "object": dict, "array": list}


@pytest.fixture(scope="module")
def openapi() -> dict[str, Any]:
    return create_app().openapi()


def resolve(openapi: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in schema:
        return openapi["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]  # type: ignore[no-any-return]
    return schema


def answer_schema(openapi: dict[str, Any], endpoint: tuple[str, str], status: str) -> dict[str, Any]:
    path, method = endpoint
    response = openapi["paths"][path][method]["responses"][status]
    return resolve(openapi, response["content"]["application/json"]["schema"])


def types_of(schema: dict[str, Any]) -> set[str]:
    return {option["type"] for option in schema["anyOf"]} if "anyOf" in schema else {schema["type"]}


def assert_documented(openapi: dict[str, Any], schema: dict[str, Any], value: dict[str, Any]) -> None:
    """`value` has exactly the documented keys, all required, each of a documented JSON type."""
    properties = schema["properties"]
    assert list(value) == list(properties)
    assert set(schema["required"]) == set(properties)
    for name, field in properties.items():
        field = resolve(openapi, field)
        assert any(isinstance(value[name], JSON_TYPES[kind]) for kind in types_of(field)), (name, value[name])


@pytest.mark.parametrize("endpoint", [CREATE, TASK], ids=["create", "task"])
def test_every_answer_is_a_documented_envelope(openapi: dict[str, Any], endpoint: tuple[str, str]) -> None:
    path, method = endpoint
    responses = openapi["paths"][path][method]["responses"]
    assert "200" in responses
    for status in responses:
        schema = answer_schema(openapi, endpoint, status)
        assert list(schema["properties"]) == ["code", "message", "data"], status
        data = resolve(openapi, schema["properties"]["data"])
        if status == "200":
            assert data.get("type") == "object" and data["properties"], "the 200's data is typed"
        else:
            assert data["type"] == "null", status


def test_the_errors_of_the_seed_and_the_contract_are_documented(openapi: dict[str, Any]) -> None:
    create = openapi["paths"][CREATE[0]][CREATE[1]]["responses"]
    task = openapi["paths"][TASK[0]][TASK[1]]["responses"]
    assert {"400", "401", "403", "404", "422", "500", "503"} <= set(create)
    assert {"401", "404", "503"} <= set(task)
    assert "default" in create and "default" in task  # any other status: the same envelope
    # Validation errors are 400s in the envelope: FastAPI's own 422 schema is not documented.
    assert "HTTPValidationError" not in openapi["components"]["schemas"]


@pytest.mark.usefixtures("worker")
async def test_answers_have_exactly_the_documented_fields(
    openapi: dict[str, Any], api: httpx.AsyncClient, temporal: Client
) -> None:
    created = (await api.post(CREATE[0], json=body(), headers=auth())).json()
    schema = answer_schema(openapi, CREATE, "200")
    assert_documented(openapi, schema, created)
    assert_documented(openapi, resolve(openapi, schema["properties"]["data"]), created["data"])

    task_path = TASK[0].format(task_id=created["data"]["task_id"])
    early = (await api.get(task_path, headers=auth())).json()  # null where the run has not got that far
    await result_of(temporal, created["data"]["task_id"])
    ended = (await api.get(task_path, headers=auth())).json()
    schema = answer_schema(openapi, TASK, "200")
    for state in (early, ended):
        assert_documented(openapi, schema, state)
        assert_documented(openapi, resolve(openapi, schema["properties"]["data"]), state["data"])
    assert ended["data"]["status"] in resolve(openapi, schema["properties"]["data"])["properties"]["status"]["enum"]

    refused = (await api.post(CREATE[0], json=body(box_id="no-such-box"), headers=auth())).json()
    assert_documented(openapi, answer_schema(openapi, CREATE, "404"), refused)
