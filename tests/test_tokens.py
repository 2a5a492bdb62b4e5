"""Session tokens as an attacker with a leaked token and an operator cleaning up would meet them: expiry and
revocation hold on a real request, `boxctl token ...` and `user disable` do what they say, listings never show
a token, and a reload of the admin file never brings a revoked token back."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy import Engine
from sqlmodel import select

import boxctl
import settings as settings_module
from api.deps import UNAUTHORIZED
from db.engine import session
from db.load import LoadError, load_admin_data
from db.models import SessionToken
from db.tokens import as_utc, token_hash
from settings import Settings
from tests.factories import ADMIN_DATA, ALICE, BOB, auth

UNKNOWN_TASK = "/api/v1/vm/manage/tasks/clone-no-such-task"
LOADED = "loaded-session-token-0123456789abcdef"

Boxctl = Callable[..., tuple[int, str, str]]


@pytest.fixture
def boxctl_run(
    settings: Settings, engine: Engine, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[Boxctl]:
    """`boxctl ARGS...` on the test's database: (exit status, stdout, stderr)."""
    url = settings.database_url
    monkeypatch.setenv("DATABASE_URL", url.get_secret_value() if isinstance(url, SecretStr) else url)
    settings_module.get_settings.cache_clear()

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        status = boxctl.main(list(argv))
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    yield run
    settings_module.get_settings.cache_clear()


async def answer(api: httpx.AsyncClient, token: str) -> int:
    """The status a real request with this token gets: 404 (the task is unknown) once the token is accepted."""
    response = await api.get(UNKNOWN_TASK, headers=auth(token))
    if response.status_code == 401:
        assert response.json() == {"code": 401, "message": UNAUTHORIZED, "data": None}
    return response.status_code


def issued(out: str) -> tuple[str, str]:
    """(token, id) from the two lines `boxctl token issue` prints."""
    token_line, id_line = out.splitlines()
    assert token_line.startswith("token: ") and id_line.startswith("id: tok_")
    return token_line.removeprefix("token: "), id_line.removeprefix("id: ")


def alice_with(*tokens: Any) -> dict[str, Any]:
    return {"users": [{"username": "alice", "plan": "small", "tokens": list(tokens)}]}


def stored(engine: Engine, token: str) -> SessionToken:
    with session(engine) as db:
        row = db.get(SessionToken, token_hash(token))
    assert row is not None
    return row


def iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


# ------------------------------------------------------------------------------ expiry


async def test_a_token_loaded_with_an_instant_already_past_gets_401(api: httpx.AsyncClient, engine: Engine) -> None:
    future = "future-session-token-0123456789abcdef"
    report = load_admin_data(
        engine,
        alice_with(
            {"token": LOADED, "expires_at": "2020-01-01T00:00:00Z"},
            {"token": future, "expires_at": "2999-01-01T00:00:00+02:00"},
        ),
    )
    assert report.tokens_added == 2
    assert await answer(api, LOADED) == 401
    assert await answer(api, future) == 404
    assert as_utc(stored(engine, future).expires_at or datetime.min) == datetime(2998, 12, 31, 22, tzinfo=UTC)


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
async def test_a_token_stops_working_when_it_expires(api: httpx.AsyncClient, engine: Engine) -> None:
    load_admin_data(engine, alice_with({"token": LOADED, "expires_at": iso(datetime.now(UTC) + timedelta(seconds=2))}))
    assert await answer(api, LOADED) == 404
    await asyncio.sleep(2.2)
    assert await answer(api, LOADED) == 401
    assert await answer(api, ALICE) == 404  # the user's other tokens are not touched


async def test_issue_with_expires_in_sets_the_expiry(
    api: httpx.AsyncClient, boxctl_run: Boxctl, engine: Engine
) -> None:
    before = datetime.now(UTC)
    status, out, _ = boxctl_run("token", "issue", "alice", "--expires-in", "7")
    assert status == 0
    token, token_id = issued(out)
    row = stored(engine, token)
    assert row.id == token_id and row.expires_at is not None
    assert before + timedelta(days=7) <= as_utc(row.expires_at) <= datetime.now(UTC) + timedelta(days=7)
    assert await answer(api, token) == 404

    status, out, _ = boxctl_run("token", "issue", "alice")
    assert status == 0 and stored(engine, issued(out)[0]).expires_at is None  # default: never expires
    for bad in ("0", "-1", "1.5", "soon", "36501", "99999999999"):
        with pytest.raises(SystemExit):
            boxctl_run("token", "issue", "alice", "--expires-in", bad)


def test_load_refuses_a_bad_expiry_naming_the_entry_and_writes_nothing(engine: Engine) -> None:
    for expires_at, problem in (
        ("2027-01-01T00:00:00", "timezone"),
        ("next year", "valid datetime"),
        (1798761600, "date-time string"),
    ):
        with pytest.raises(LoadError) as refused:
            load_admin_data(engine, alice_with(ALICE, {"token": LOADED, "expires_at": expires_at}))
        assert refused.value.message.startswith("users[0] (alice): tokens[1].expires_at: ")
        assert problem in refused.value.message
    with pytest.raises(LoadError, match=r"users\[0\] \(alice\): unknown key 'tokens\[0\]\.expiry'"):
        load_admin_data(engine, alice_with({"token": LOADED, "expiry": "2027-01-01T00:00:00Z"}))
    with session(engine) as db:
        assert db.get(SessionToken, token_hash(LOADED)) is None


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
def test_a_reload_brings_the_expiry_of_a_token_to_the_files(engine: Engine) -> None:
    load_admin_data(engine, alice_with({"token": LOADED, "expires_at": "2027-01-01T00:00:00Z"}))
    again = load_admin_data(engine, alice_with({"token": LOADED, "expires_at": "2027-01-01T00:00:00Z"}))
    assert not again.changed
    later = load_admin_data(engine, alice_with({"token": LOADED, "expires_at": "2028-06-01T12:00:00+02:00"}))
    assert (later.tokens_updated, later.users.updated) == (1, 1)
    assert as_utc(stored(engine, LOADED).expires_at or datetime.min) == datetime(2028, 6, 1, 10, tzinfo=UTC)
    load_admin_data(engine, alice_with(LOADED))  # the plain string form: never expires
    assert stored(engine, LOADED).expires_at is None


# ------------------------------------------------------------------------------ revocation


async def test_a_revoked_token_gets_401_and_revoke_says_so(
    api: httpx.AsyncClient, boxctl_run: Boxctl, engine: Engine
) -> None:
    status, out, _ = boxctl_run("token", "issue", "alice")
    token, token_id = issued(out)
    assert await answer(api, token) == 404

    status, out, err = boxctl_run("token", "revoke", token_id)
    assert (status, err) == (0, "") and out.startswith(f"{token_id} (alice) revoked at ")
    assert await answer(api, token) == 401
    assert await answer(api, ALICE) == 404  # only that token

    status, out, _ = boxctl_run("token", "revoke", token_id)
    assert status == 0 and "was already revoked" in out
    assert await answer(api, token) == 401


def test_revoking_an_unknown_id_fails(boxctl_run: Boxctl) -> None:
    assert boxctl_run("token", "revoke", "tok_0000000000000000") == (
        1,
        "",
        "boxctl: no token has the id 'tok_0000000000000000'\n",
    )


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
async def test_user_disable_revokes_all_of_the_users_tokens(
    api: httpx.AsyncClient, boxctl_run: Boxctl, engine: Engine
) -> None:
    issued_token, _ = issued(boxctl_run("token", "issue", "alice")[1])
    assert await answer(api, ALICE) == await answer(api, issued_token) == 404

    status, out, _ = boxctl_run("user", "disable", "alice")
    assert status == 0 and out.startswith("alice: 2 tokens revoked")
    assert await answer(api, ALICE) == await answer(api, issued_token) == 401
    assert await answer(api, BOB) == 404  # other users keep theirs
    assert boxctl_run("user", "disable", "nobody")[::2] == (1, "boxctl: user 'nobody' is not defined\n")


async def test_a_reload_never_revives_a_revoked_token(
    api: httpx.AsyncClient, boxctl_run: Boxctl, engine: Engine
) -> None:
    assert boxctl_run("user", "disable", "alice")[0] == 0
    revoked_at = stored(engine, ALICE).revoked_at

    report = load_admin_data(engine, ADMIN_DATA)
    assert (report.tokens_added, report.tokens_kept_revoked) == (0, 1)
    # Nor as an object with a new expiry.
    load_admin_data(engine, alice_with({"token": ALICE, "expires_at": "2999-01-01T00:00:00Z"}))
    row = stored(engine, ALICE)
    assert (row.revoked_at, row.expires_at) == (revoked_at, None)
    assert await answer(api, ALICE) == 401


# ------------------------------------------------------------------------------ listing


def test_list_shows_ids_and_times_never_the_token(boxctl_run: Boxctl, engine: Engine) -> None:
    token, token_id = issued(boxctl_run("token", "issue", "alice", "--expires-in", "30")[1])
    revoked, revoked_id = issued(boxctl_run("token", "issue", "alice")[1])
    boxctl_run("token", "revoke", revoked_id)

    status, out, _ = boxctl_run("token", "list", "alice")
    assert status == 0
    header, *lines = out.splitlines()
    assert header.split() == ["ID", "CREATED", "EXPIRES", "REVOKED"]
    with session(engine) as db:
        rows = {row.id: row for row in db.exec(select(SessionToken).where(SessionToken.username == "alice")).all()}
    assert sorted(line.split()[0] for line in lines) == sorted(rows)  # the loaded token and the two issued
    by_id = {line.split()[0]: line for line in lines}
    expires = as_utc(rows[token_id].expires_at or datetime.min).strftime("%Y-%m-%d %H:%M:%S")
    assert expires in by_id[token_id] and by_id[token_id].endswith("-")  # expires, not revoked
    assert by_id[revoked_id].split()[3] == "-" and not by_id[revoked_id].endswith("-")  # never expires; revoked
    for secret in (token, revoked, ALICE):
        assert secret not in out and token_hash(secret) not in out

    assert boxctl_run("token", "list", "nobody")[::2] == (1, "boxctl: user 'nobody' is not defined\n")
