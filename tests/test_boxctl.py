"""`boxctl load` semantics (db/load.py) and the boxctl CLI, on SQLite and, when reachable, PostgreSQL."""

import copy
import json
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine
from sqlmodel import SQLModel, select

import boxctl
import settings
from db.engine import make_engine, session
from db.load import LoadError, load_admin_data
from db.models import Box, Plan, Reservation, SessionToken, Template, TemplateUser, User, Vm
from db.schema import upgrade
from db.tokens import lookup, token_hash, username_for

TOKEN = "a-session-token-of-at-least-32-chars"

# The example of CONTRACT.md, "Admin data: `boxctl load FILE`".
EXAMPLE: dict[str, Any] = {
    "plans": [
        {
            "id": "small",
            "name": "Small",
            "per_vm": {"cores": 4, "memory_mb": 8192, "disk_gb": 100},
            "total": {"cores": 8, "memory_mb": 16384, "disk_gb": 200, "vms": 5},
        }
    ],
    "users": [{"username": "alice", "plan": "small", "tokens": [TOKEN]}],
    "templates": [
        {
            "id": "tpl-ubuntu",
            "name": "Ubuntu 24.04",
            "node": "pve1",
            "vmid": 9000,
            "public": False,
            "allowed_users": ["alice"],
        }
    ],
    "boxes": [{"id": "60d5ec49f1b2c8a1e4d3b2a1", "name": "Ubuntu box", "template": "tpl-ubuntu"}],
}

TABLES: list[type[SQLModel]] = [Plan, User, SessionToken, Template, TemplateUser, Box, Reservation, Vm]


def example() -> dict[str, Any]:
    return copy.deepcopy(EXAMPLE)


def snapshot(engine: Engine) -> dict[str, list[dict[str, Any]]]:
    """Every row of every table, in a stable order, to compare before and after."""
    with session(engine) as db:
        return {
            model.__name__: sorted(
                (row.model_dump() for row in db.exec(select(model)).all()),
                key=lambda r: repr(sorted(r.items())),
            )
            for model in TABLES
        }


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "t.db"


@pytest.fixture
def engine(db_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{db_path}")
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def cli_env(engine: Engine, db_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Point boxctl at the test database (upgraded by `engine`); settings are cached, so clear them on both sides."""
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{db_path}")
    settings.get_settings.cache_clear()
    yield
    settings.get_settings.cache_clear()


def write_json(tmp_path: Path, data: Any, name: str = "admin.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


# --- load_admin_data ---------------------------------------------------------------------------------


def test_example_loads(engine: Engine) -> None:
    report = load_admin_data(engine, example())
    assert report.lines() == [
        "plans: 1 created, 0 updated, 0 unchanged",
        "users: 1 created, 0 updated, 0 unchanged",
        "templates: 1 created, 0 updated, 0 unchanged",
        "boxes: 1 created, 0 updated, 0 unchanged",
        "tokens: 1 added, 0 updated, 0 revoked (not revived)",
        "allowed users: 1 added",
    ]
    with session(engine) as db:
        plan = db.get(Plan, "small")
        assert plan is not None
        assert (plan.name, plan.per_vm_cores, plan.per_vm_memory_mb, plan.per_vm_disk_gb) == (
            "Small",
            4,
            8192,
            100,
        )
        assert (plan.total_cores, plan.total_memory_mb, plan.total_disk_gb, plan.total_vms) == (
            8,
            16384,
            200,
            5,
        )
        user = db.get(User, "alice")
        assert user is not None and user.plan_id == "small"
        template = db.get(Template, "tpl-ubuntu")
        assert template is not None
        assert (template.name, template.node, template.vmid, template.public) == (
            "Ubuntu 24.04",
            "pve1",
            9000,
            False,
        )
        assert db.get(TemplateUser, ("tpl-ubuntu", "alice")) is not None
        box = db.get(Box, "60d5ec49f1b2c8a1e4d3b2a1")
        assert box is not None and (box.name, box.template_id) == ("Ubuntu box", "tpl-ubuntu")
    assert username_for(engine, TOKEN) == "alice"


def test_second_load_changes_nothing(engine: Engine) -> None:
    load_admin_data(engine, example())
    before = snapshot(engine)
    report = load_admin_data(engine, example())
    assert not report.changed
    assert report.lines() == [
        "plans: 0 created, 0 updated, 1 unchanged",
        "users: 0 created, 0 updated, 1 unchanged",
        "templates: 0 created, 0 updated, 1 unchanged",
        "boxes: 0 created, 0 updated, 1 unchanged",
        "tokens: 0 added, 0 updated, 0 revoked (not revived)",
        "allowed users: 0 added",
    ]
    assert snapshot(engine) == before


def test_load_updates_and_never_deletes(engine: Engine) -> None:
    load_admin_data(engine, example())
    other = "another-session-token-of-at-least-32-chars"
    data: dict[str, Any] = {
        "plans": [
            {
                "id": "small",
                "name": "Small v2",
                "per_vm": {"cores": 2, "memory_mb": 4096, "disk_gb": 50},
                "total": {"cores": 8, "memory_mb": 16384, "disk_gb": 200},
            }
        ],
        "users": [{"username": "alice", "plan": "small", "tokens": [other]}, {"username": "bob"}],
        "templates": [{"id": "tpl-ubuntu", "name": "Ubuntu 24.04", "node": "pve2", "vmid": 9000}],
    }
    report = load_admin_data(engine, data)
    assert (report.plans.updated, report.users.updated, report.users.created) == (1, 1, 1)
    assert (report.templates.updated, report.boxes.unchanged, report.boxes.created) == (1, 0, 0)
    with session(engine) as db:
        plan = db.get(Plan, "small")
        assert plan is not None and (plan.per_vm_cores, plan.total_vms) == (2, None)
        template = db.get(Template, "tpl-ubuntu")
        assert template is not None and template.node == "pve2" and template.public is False
        # Omitted allowed_users and boxes delete nothing; tokens are added to, not replaced.
        assert db.get(TemplateUser, ("tpl-ubuntu", "alice")) is not None
        assert db.get(Box, "60d5ec49f1b2c8a1e4d3b2a1") is not None
        bob = db.get(User, "bob")
        assert bob is not None and bob.plan_id is None
    assert username_for(engine, TOKEN) == "alice"
    assert username_for(engine, other) == "alice"


@pytest.mark.parametrize("plan", [{}, {"plan": None}], ids=["omitted", "null"])
def test_user_plan_omitted_or_null_means_no_plan(engine: Engine, plan: dict[str, Any]) -> None:
    load_admin_data(engine, example())
    load_admin_data(engine, {"users": [{"username": "alice", **plan}]})
    with session(engine) as db:
        user = db.get(User, "alice")
        assert user is not None and user.plan_id is None


def refused(engine: Engine, data: Any) -> str:
    """Load `data`, expect a refusal, check that nothing was written, and return the message."""
    before = snapshot(engine)
    with pytest.raises(LoadError) as info:
        load_admin_data(engine, data)
    assert snapshot(engine) == before
    return info.value.message


def test_unknown_key_refused_naming_the_entry(engine: Engine) -> None:
    data = example()
    data["users"].append({"username": "bob", "tokns": [TOKEN]})
    message = refused(engine, data)
    assert message == "users[1] (bob): unknown key 'tokns'"


def test_unknown_nested_and_top_level_keys_refused(engine: Engine) -> None:
    data = example()
    data["plans"][0]["per_vm"]["gpus"] = 1
    data["vms"] = []
    message = refused(engine, data)
    assert "plans[0] (small): unknown key 'per_vm.gpus'" in message
    assert "unknown key 'vms'" in message


@pytest.mark.parametrize(
    ("section", "path", "value", "expected"),
    [
        ("plans", ("per_vm", "cores"), -4, "plans[0] (small): per_vm.cores: Input should be greater than 0"),
        ("plans", ("per_vm", "cores"), 0, "plans[0] (small): per_vm.cores: Input should be greater than 0"),
        (
            "plans",
            ("total", "memory_mb"),
            True,
            "plans[0] (small): total.memory_mb: Input should be a valid integer",
        ),
        (
            "plans",
            ("total", "disk_gb"),
            "200",
            "plans[0] (small): total.disk_gb: Input should be a valid integer",
        ),
        ("plans", ("total", "vms"), 2.5, "plans[0] (small): total.vms:"),
        ("templates", ("vmid",), "9000", "templates[0] (tpl-ubuntu): vmid: Input should be a valid integer"),
        (
            "templates",
            ("public",),
            "yes",
            "templates[0] (tpl-ubuntu): public: Input should be a valid boolean",
        ),
        (
            "boxes",
            ("template",),
            "",
            "boxes[0] (60d5ec49f1b2c8a1e4d3b2a1): template: String should have at least 1",
        ),
        ("users", ("tokens",), ["too-short"], "users[0] (alice): tokens[0]: String should have at least 32"),
        (
            "users",
            ("tokens",),
            [TOKEN + " x"],
            "users[0] (alice): tokens[0]: Value error, must be printable ASCII",
        ),
        ("users", ("tokens",), TOKEN, "users[0] (alice): tokens: Input should be a valid list"),
    ],
)
def test_bad_value_refused(engine: Engine, section: str, path: tuple[str, ...], value: Any, expected: str) -> None:
    data = example()
    target = data[section][0]
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    assert refused(engine, data).startswith(expected)


def test_missing_key_and_empty_id_refused(engine: Engine) -> None:
    data = example()
    del data["templates"][0]["vmid"]
    data["plans"][0]["id"] = ""
    message = refused(engine, data)
    assert "templates[0] (tpl-ubuntu): missing key 'vmid'" in message
    assert "plans[0]: id: String should have at least 1 character" in message


def test_not_an_object_refused(engine: Engine) -> None:
    assert "JSON object" in refused(engine, [EXAMPLE])


def test_duplicate_entry_refused(engine: Engine) -> None:
    data = example()
    data["boxes"].append({"id": "60d5ec49f1b2c8a1e4d3b2a1", "name": "Other", "template": "x"})
    message = refused(engine, data)
    assert message == (
        "boxes[1] (60d5ec49f1b2c8a1e4d3b2a1): id '60d5ec49f1b2c8a1e4d3b2a1' is already defined by boxes[0]"
    )


def test_token_of_another_user_refused(engine: Engine) -> None:
    load_admin_data(engine, example())
    message = refused(engine, {"users": [{"username": "bob", "tokens": [TOKEN]}]})
    assert message == "users[0] (bob): tokens[0] is already a token of user 'alice'"
    assert TOKEN not in message


def test_user_plan_undefined_refused(engine: Engine) -> None:
    data = example()
    data["users"].append({"username": "bob", "plan": "gold"})
    message = refused(engine, data)
    assert message == "users[1] (bob): plan 'gold' is defined neither in the file nor in the database"


def test_user_plan_defined_in_database_accepted(engine: Engine) -> None:
    load_admin_data(engine, example())
    report = load_admin_data(engine, {"users": [{"username": "bob", "plan": "small"}]})
    assert report.users.created == 1
    with session(engine) as db:
        bob = db.get(User, "bob")
        assert bob is not None and bob.plan_id == "small"


def test_template_allowed_user_undefined_refused(engine: Engine) -> None:
    data = example()
    data["templates"][0]["allowed_users"].append("carol")
    message = refused(engine, data)
    assert message == (
        "templates[0] (tpl-ubuntu): allowed user 'carol' is defined neither in the file nor in the database"
    )


def test_template_allowed_user_defined_in_database_accepted(engine: Engine) -> None:
    load_admin_data(engine, example())
    template = {
        "id": "tpl-debian",
        "name": "Debian",
        "node": "pve1",
        "vmid": 9001,
        "allowed_users": ["alice"],
    }
    load_admin_data(engine, {"templates": [template]})
    with session(engine) as db:
        assert db.get(TemplateUser, ("tpl-debian", "alice")) is not None


def test_box_with_undefined_template_accepted(engine: Engine) -> None:
    report = load_admin_data(engine, {"boxes": [{"id": "b1", "name": "Orphan", "template": "tpl-none"}]})
    assert report.boxes.created == 1
    with session(engine) as db:
        box = db.get(Box, "b1")
        assert box is not None and box.template_id == "tpl-none"


def test_tokens_stored_only_as_hashes(engine: Engine, db_path: Path) -> None:
    load_admin_data(engine, example())
    with session(engine) as db:
        assert db.get(SessionToken, token_hash(TOKEN)) is not None
    engine.dispose()
    files = [db_path, *db_path.parent.glob(db_path.name + "-*")]  # the database, plus any -wal/-shm
    for path in files:
        assert TOKEN.encode() not in path.read_bytes()


# --- the CLI -----------------------------------------------------------------------------------------


@pytest.mark.usefixtures("cli_env")
def test_cli_load_twice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = write_json(tmp_path, EXAMPLE)
    assert boxctl.main(["load", file]) == 0
    assert "plans: 1 created, 0 updated, 0 unchanged" in capsys.readouterr().out
    assert boxctl.main(["load", file]) == 0
    out = capsys.readouterr().out
    for kind in ("plans", "users", "templates", "boxes"):
        assert f"{kind}: 0 created, 0 updated, 1 unchanged" in out


@pytest.mark.usefixtures("cli_env")
def test_cli_load_refused(tmp_path: Path, db_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = example()
    data["users"][0]["plan"] = "gold"
    assert boxctl.main(["load", write_json(tmp_path, data)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "boxctl: users[0] (alice): plan 'gold' is defined neither in the file nor in the database" in captured.err
    engine = make_engine(f"sqlite:///{db_path}")
    assert all(rows == [] for rows in snapshot(engine).values())
    engine.dispose()


@pytest.mark.usefixtures("cli_env")
def test_cli_load_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert boxctl.main(["load", str(bad)]) == 1
    assert capsys.readouterr().err.startswith(f"boxctl: {bad} is not valid JSON")
    assert boxctl.main(["load", str(tmp_path / "missing.json")]) == 1
    assert capsys.readouterr().err.startswith("boxctl: cannot read")


@pytest.mark.parametrize("command", [["db", "upgrade"], ["db", "current"], ["users"]])
def test_an_unreachable_database_is_one_line_not_a_traceback(
    command: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Port 1: nothing listens there.
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg://boxes@127.0.0.1:1/boxes")
    settings.get_settings.cache_clear()
    try:
        assert boxctl.main(command) == 1
    finally:
        settings.get_settings.cache_clear()
    err = capsys.readouterr().err
    assert err.startswith("boxctl: database error (DATABASE_URL): connection failed"), err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.usefixtures("cli_env")
def test_cli_token_issue(tmp_path: Path, db_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert boxctl.main(["load", write_json(tmp_path, EXAMPLE)]) == 0
    capsys.readouterr()
    assert boxctl.main(["token", "issue", "alice"]) == 0
    token_line, id_line = capsys.readouterr().out.splitlines()
    assert token_line.startswith("token: ") and id_line.startswith("id: tok_")
    token = token_line.removeprefix("token: ")
    assert len(token) >= 32
    engine = make_engine(f"sqlite:///{db_path}")
    caller = lookup(engine, token)
    assert caller is not None and (caller.username, caller.token_id) == ("alice", id_line.removeprefix("id: "))
    engine.dispose()

    assert boxctl.main(["token", "issue", "nobody"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "boxctl: user 'nobody' is not defined\n"


@pytest.mark.usefixtures("cli_env")
def test_cli_listings(tmp_path: Path, db_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = example()
    data["boxes"].append({"id": "b-orphan", "name": "Orphan", "template": "tpl-none"})
    data["boxes"].append(ready_box())
    assert boxctl.main(["load", write_json(tmp_path, data)]) == 0
    engine = make_engine(f"sqlite:///{db_path}")
    with session(engine) as db, db.begin():
        db.add(
            Vm(
                task_id="clone-1",
                username="alice",
                vmid=106,
                node="pve2",
                name="vm1",
                cores=2,
                memory_mb=2048,
                disk_gb=20,
            )
        )
        db.add(Reservation(task_id="clone-2", username="bob", cores=1, memory_mb=1024, disk_gb=10, vmid=107))
    engine.dispose()
    capsys.readouterr()

    def run(*argv: str) -> str:
        assert boxctl.main(list(argv)) == 0
        return capsys.readouterr().out

    assert run("plans").splitlines()[1].split() == [
        "small",
        "Small",
        "4",
        "8192",
        "100",
        "8",
        "16384",
        "200",
        "5",
    ]
    assert run("users").splitlines()[1].split() == ["alice", "small", "1"]
    assert boxctl.main(["token", "issue", "alice"]) == 0
    revoked = capsys.readouterr().out.splitlines()[1].removeprefix("id: ")
    assert run("users").splitlines()[1].split() == ["alice", "small", "2"]
    assert boxctl.main(["token", "revoke", revoked]) == 0
    capsys.readouterr()
    assert run("users").splitlines()[1].split() == ["alice", "small", "1"]  # valid tokens only
    assert run("templates").splitlines()[1].split() == [
        "tpl-ubuntu",
        "Ubuntu",
        "24.04",
        "pve1",
        "9000",
        "no",
        "alice",
    ]
    boxes = run("boxes").splitlines()
    assert boxes[0].split() == ["ID", "NAME", "TEMPLATE", "START", "CLOUD-INIT", "POOL", "TAGS", "NETWORK"]
    assert boxes[1].split("  ")[:3] == ["60d5ec49f1b2c8a1e4d3b2a1", "Ubuntu box", "tpl-ubuntu"]
    assert boxes[1].split()[-5:] == ["no", "-", "-", "-", "-"]
    assert "b-orphan" in boxes[2] and "tpl-none (undefined)" in boxes[2]
    # The options compactly: the keys counted, never shown.
    assert [c for c in boxes[3].split("  ") if c][3:] == [
        "yes, ip 300s",
        "ubuntu, 2 keys, ip=dhcp, dns 192.0.2.53",
        "course-101",
        "course-101,lab",
        "vmbr1 vlan 42",
    ]
    assert "clone-1" in run("vms")
    assert "clone-1" in run("vms", "--user", "alice")
    assert "clone-1" not in run("vms", "--user", "bob")
    assert "clone-2" in run("reservations")
    assert "clone-2" not in run("reservations", "--user", "alice")
    assert "held" in run("reservations", "--user", "bob")


def ready_box() -> dict[str, Any]:
    # Imported here: tests/test_box_options.py imports this module's EXAMPLE.
    from tests.test_box_options import READY_BOX

    return READY_BOX


# --- PostgreSQL ----------------------------------------------------------------------------------------

PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture
def pg_engine() -> Iterator[Engine]:
    """A fresh database on the local PostgreSQL, dropped afterwards; skipped only if the server is down."""
    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable: {exc}")
    name = f"boxctl_{uuid.uuid4().hex[:12]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        engine = make_engine(f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}")
        try:
            upgrade(engine)
            yield engine
        finally:
            engine.dispose()
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_postgresql_load(pg_engine: Engine) -> None:
    report = load_admin_data(pg_engine, example())
    assert report.plans.created == report.users.created == report.templates.created == report.boxes.created == 1
    before = snapshot(pg_engine)
    again = load_admin_data(pg_engine, example())
    assert not again.changed
    assert snapshot(pg_engine) == before
    assert username_for(pg_engine, TOKEN) == "alice"

    data = example()
    data["users"].append({"username": "bob", "plan": "gold"})
    with pytest.raises(LoadError, match=r"users\[1\] \(bob\): plan 'gold'"):
        load_admin_data(pg_engine, data)
    assert snapshot(pg_engine) == before


@pytest.mark.usefixtures("cli_env")
def test_with_log_format_json_what_boxctl_logs_is_json_and_what_it_prints_is_not(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LOG_FORMAT", "json")
    settings.get_settings.cache_clear()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        assert boxctl.main(["plans"]) == 0
        logging.getLogger("db.clone_slots").warning("a slot of a run known to be over, freed")
    finally:
        root.handlers[:], root.level = handlers, level
    captured = capsys.readouterr()
    assert captured.out.startswith("ID")  # the listing, for a person
    [line] = [json.loads(text) for text in captured.err.splitlines()]
    assert (line["level"], line["logger"], line["message"]) == (
        "WARNING",
        "db.clone_slots",
        "a slot of a run known to be over, freed",
    )
