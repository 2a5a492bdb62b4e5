"""A box's options (issue 10, the data side): `boxctl load` takes and checks them, the database keeps them (also
for boxes made before them), GET boxes shows them, createFromBoxTemplate takes `sshKeys` and `start`, and
admission hands the options to the workflow (`Admitted.box`)."""

from __future__ import annotations

import base64
import copy
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine
from temporalio.client import Client
from temporalio.testing import ActivityEnvironment

from activities.admission import AdmissionActivities
from activities.db import DbActivities
from activities.pve import PveActivities
from api.schemas import CreateFromBoxRequest
from db.box_options import BoxSettings, CloudInitSettings, NetworkSettings
from db.boxes import template_for
from db.clone_slots import Limits
from db.engine import make_engine
from db.load import LoadError, load_admin_data
from db.schema import upgrade
from payloads import AdmitInput, BoxOptions, CloudInit, CreateFromBoxInput, Network
from pve.client import PveClient
from settings import Settings
from tests.factories import ALICE, BOX, auth, body
from tests.test_boxctl import EXAMPLE, snapshot
from workflows.policies import ADMIT_ATTEMPT


def ssh_key(kind: str = "ssh-ed25519", comment: str = "alice@laptop", size: int = 32) -> str:
    """A public key line whose blob is well formed (its type, then key bytes): what the checks look at."""
    blob = len(kind).to_bytes(4, "big") + kind.encode() + size.to_bytes(4, "big") + secrets.token_bytes(size)
    return f"{kind} {base64.b64encode(blob).decode()} {comment}".rstrip()


KEY = ssh_key()
RSA_KEY = ssh_key("ssh-rsa", "bob with spaces", size=256)
READY_BOX: dict[str, Any] = {
    "id": "box-ready",
    "name": "Ready box",
    "template": "tpl-ubuntu",
    "start": True,
    "wait_for_ip_seconds": 300,
    "cloud_init": {"user": "ubuntu", "ssh_keys": [KEY, RSA_KEY], "ipconfig0": "ip=dhcp", "nameserver": "192.0.2.53"},
    "pool": "course-101",
    "tags": ["course-101", "lab"],
    "network": {"bridge": "vmbr1", "vlan": 42},
}
READY_SETTINGS = BoxSettings(
    start=True,
    wait_for_ip_seconds=300,
    cloud_init=CloudInitSettings(user="ubuntu", ssh_keys=[KEY, RSA_KEY], ipconfig0="ip=dhcp", nameserver="192.0.2.53"),
    pool="course-101",
    tags=["course-101", "lab"],
    network=NetworkSettings(bridge="vmbr1", vlan=42),
)


def with_box(data: dict[str, Any], **changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(data)
    box = copy.deepcopy(READY_BOX)
    for key, value in changes.items():
        section, _, inner = key.partition("__")
        if inner:
            box[section][inner] = value
        elif value is ...:
            del box[section]
        else:
            box[section] = value
    data["boxes"] = [*data["boxes"], box]
    return data


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path}/t.db")
    upgrade(engine)
    yield engine
    engine.dispose()


# ------------------------------------------------------------------------------ boxctl load


def test_a_box_with_every_option_is_kept_and_loading_it_again_changes_nothing(db: Engine) -> None:
    assert load_admin_data(db, with_box(EXAMPLE)).boxes.created == 2

    assert template_for(db, "alice", "box-ready").box == READY_SETTINGS
    # A box that names no option has none (the example's box).
    assert template_for(db, "alice", EXAMPLE["boxes"][0]["id"]).box == BoxSettings()
    before = snapshot(db)
    again = load_admin_data(db, with_box(EXAMPLE))
    assert (again.boxes.unchanged, again.changed) == (2, False)
    assert snapshot(db) == before

    changed = load_admin_data(db, with_box(EXAMPLE, network__vlan=43, tags=["lab"]))
    assert changed.boxes.updated == 1
    box = template_for(db, "alice", "box-ready").box
    assert (box.network, box.tags) == (NetworkSettings(bridge="vmbr1", vlan=43), ["lab"])


# The contract's own example box ("Boxes carry what makes a VM ready to use"), word for word.
CONTRACT_BOX: dict[str, Any] = {
    "id": "60d5ec49f1b2c8a1e4d3b2a1",
    "name": "Ubuntu box",
    "template": "tpl-ubuntu",
    "start": True,
    "wait_for_ip_seconds": 300,
    "cloud_init": {
        "user": "ubuntu",
        "ssh_keys": ["ssh-ed25519 AAAAC3Nz... a@b"],
        "ipconfig0": "ip=dhcp",
        "nameserver": "192.0.2.53",
    },
    "pool": "course-101",
    "tags": ["course-101"],
    "network": {"bridge": "vmbr1", "vlan": 42},
}


def test_the_contracts_example_box_loads_as_written(db: Engine) -> None:
    """Its key is elided (`AAAAC3Nz...`): the shape is checked here, the key itself by PVE when it configures."""
    data = copy.deepcopy(EXAMPLE)
    data["boxes"] = [CONTRACT_BOX]
    load_admin_data(db, data)
    box = template_for(db, "alice", CONTRACT_BOX["id"]).box
    assert box.cloud_init is not None and box.cloud_init.ssh_keys == ["ssh-ed25519 AAAAC3Nz... a@b"]
    assert (box.start, box.wait_for_ip_seconds, box.pool) == (True, 300, "course-101")


def test_optional_parts_may_be_left_out(db: Engine) -> None:
    data = with_box(
        EXAMPLE,
        cloud_init={"ssh_keys": [KEY]},
        network={"vlan": 7},
        pool="parent/child/leaf",
        tags=["a", "a"],
        wait_for_ip_seconds=...,
    )
    load_admin_data(db, data)
    box = template_for(db, "alice", "box-ready").box
    assert box.cloud_init == CloudInitSettings(ssh_keys=[KEY])
    assert (box.network, box.pool, box.tags, box.wait_for_ip_seconds) == (
        NetworkSettings(vlan=7),
        "parent/child/leaf",
        ["a"],  # PVE keeps a tag once
        0,
    )


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"colour": "blue"}, "unknown key 'colour'"),
        ({"cloud_init__password": "x"}, "unknown key 'cloud_init.password'"),
        ({"network__model": "virtio"}, "unknown key 'network.model'"),
        ({"start": "yes"}, "start: Input should be a valid boolean"),
        ({"wait_for_ip_seconds": -1}, "wait_for_ip_seconds: Input should be greater than or equal to 0"),
        ({"wait_for_ip_seconds": 1.5}, "wait_for_ip_seconds: Input should be a valid integer"),
        ({"wait_for_ip_seconds": True}, "wait_for_ip_seconds: Input should be a valid integer"),
        ({"network__vlan": 0}, "network.vlan: Input should be greater than or equal to 1"),
        ({"network__vlan": 4095}, "network.vlan: Input should be less than or equal to 4094"),
        ({"network__vlan": "42"}, "network.vlan: Input should be a valid integer"),
        ({"network__bridge": "vmbr 1"}, "network.bridge: Value error, must be a bridge name"),
        ({"network__bridge": "a-bridge-name-too-long"}, "network.bridge: Value error, must be a bridge name"),
        ({"tags": ["Course"]}, "tags[0]: Value error, must be a PVE tag"),
        ({"tags": ["ok", "-lead"]}, "tags[1]: Value error, must be a PVE tag"),
        ({"tags": ["a;b"]}, "tags[0]: Value error, must be a PVE tag"),
        ({"tags": "lab"}, "tags: Input should be a valid list"),
        ({"pool": "a b"}, "pool: Value error, must be a PVE pool name"),
        ({"pool": "a/b/c/d"}, "pool: Value error, must be a PVE pool name"),
        ({"pool": ""}, "pool: Value error, must be a PVE pool name"),
        ({"cloud_init__user": "Root Admin"}, "cloud_init.user: Value error, must be a login name"),
        ({"cloud_init__ssh_keys": ["not a key"]}, "cloud_init.ssh_keys[0]: Value error, does not start with a key"),
        ({"cloud_init__ssh_keys": [KEY + "\nssh-ed25519 AAAA"]}, "cloud_init.ssh_keys[0]: Value error, is not one"),
        ({"cloud_init__ssh_keys": ["ssh-ed25519"]}, "ssh_keys[0]: Value error, has no key after its type"),
        ({"cloud_init__ssh_keys": ["ssh-ed25519  a@b"]}, "ssh_keys[0]: Value error, has no key after its type"),
        ({"cloud_init__ipconfig0": "dhcp"}, "cloud_init.ipconfig0: Value error, must be PVE's ipconfig"),
        ({"cloud_init__ipconfig0": "ip=10.0.0.5"}, "ip must be dhcp, manual or an IPv4 CIDR"),
        ({"cloud_init__ipconfig0": "ip=10.0.0.5/24,gw=10.0.0.300"}, "gw must be an IPv4 address"),
        ({"cloud_init__ipconfig0": "ip6=2001:db8::5/64,gw=10.0.0.1"}, "gw needs ip"),
        ({"cloud_init__ipconfig0": "ip=dhcp,ip=dhcp"}, "once each"),
        ({"cloud_init__nameserver": "dns.example"}, "nameserver: Value error, must be IP addresses"),
    ],
)
def test_a_bad_option_names_the_box_and_nothing_is_written(db: Engine, changes: dict[str, Any], says: str) -> None:
    load_admin_data(db, EXAMPLE)
    before = snapshot(db)
    data = with_box(EXAMPLE, **changes)
    data["plans"].append({**EXAMPLE["plans"][0], "id": "other"})  # would be written, were the file taken

    with pytest.raises(LoadError) as refused:
        load_admin_data(db, data)

    assert refused.value.message.startswith("boxes[1] (box-ready): "), refused.value.message
    assert says in refused.value.message
    assert KEY not in refused.value.message  # the messages never repeat the value
    assert snapshot(db) == before


@pytest.mark.parametrize(
    "ipconfig",
    ["ip=dhcp", "ip=192.0.2.10/24,gw=192.0.2.1", "ip6=auto", "ip6=2001:db8::10/64,gw6=2001:db8::1,ip=dhcp"],
)
def test_pves_ipconfig_forms_are_taken(db: Engine, ipconfig: str) -> None:
    load_admin_data(db, with_box(EXAMPLE, cloud_init__ipconfig0=ipconfig, cloud_init__nameserver="192.0.2.53 ::1"))
    box = template_for(db, "alice", "box-ready").box
    assert box.cloud_init is not None and box.cloud_init.ipconfig0 == ipconfig


def test_boxes_of_a_database_made_before_the_options_have_none(tmp_path: Path) -> None:
    before = tmp_path / "old.db"
    shutil.copy(Path(__file__).parent / "data" / "app-before-alembic.db", before)
    engine = make_engine(f"sqlite:///{before}")
    try:
        upgrade(engine)
        assert template_for(engine, "alice", BOX).box == BoxSettings()
        # And they take options from then on.
        load_admin_data(engine, with_box({"boxes": []}))
        assert template_for(engine, "alice", "box-ready").box == READY_SETTINGS
    finally:
        engine.dispose()


# ------------------------------------------------------------------------------ the request


def test_the_request_carries_ssh_keys_and_start_into_the_workflows_input() -> None:
    request = CreateFromBoxRequest.model_validate(body(sshKeys=[KEY], start=False))
    ask = request.to_input("alice", "NFS")
    assert (ask.ssh_keys, ask.start) == ([KEY], False)
    plain = CreateFromBoxRequest.model_validate(body()).to_input("alice", "NFS")
    assert (plain.ssh_keys, plain.start) == ([], None)  # start None: as the box says


API = "/api/v1/vm/manage"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sshKeys": [KEY, "ssh-ed25519 AAAA\x1b[31m"]}, "'sshKeys' item 1 is not one line of printable characters"),
        ({"sshKeys": [KEY + "\n" + KEY]}, "'sshKeys' item 0 is not one line of printable characters"),
        ({"sshKeys": ["hello"]}, "'sshKeys' item 0 does not start with a key type"),
        ({"sshKeys": [7]}, "'sshKeys' item 0 is not a string"),
        ({"sshKeys": KEY}, "'sshKeys' must be a list of public keys"),
        ({"start": "yes"}, "'start' must be true or false"),
        ({"box_id": "b" * 256}, "'box_id' must be at most 255 characters"),
        ({"ssh_keys": [KEY]}, "unknown field 'ssh_keys'"),
    ],
)
async def test_bad_keys_or_start_are_a_400_naming_the_field(
    api: httpx.AsyncClient, overrides: dict[str, Any], message: str
) -> None:
    response = await api.post(f"{API}/createFromBoxTemplate", json=body(**overrides), headers=auth())
    assert response.status_code == 400, response.text
    assert response.json()["message"].startswith("Invalid request body: " + message), response.json()


@pytest.mark.usefixtures("worker")
async def test_the_api_takes_ssh_keys_and_start(api: httpx.AsyncClient, temporal: Client) -> None:
    keys = [RSA_KEY, "ssh-ed25519 AAAAC3Nz... a@b"]  # the second as the contract writes it
    response = await api.post(f"{API}/createFromBoxTemplate", json=body(sshKeys=keys, start=False), headers=auth())
    assert response.status_code == 200, response.text
    handle = temporal.get_workflow_handle(response.json()["data"]["task_id"])
    history = await handle.fetch_history()
    started = history.events[0].workflow_execution_started_event_attributes
    (ask,) = await temporal.data_converter.decode(started.input.payloads, [CreateFromBoxInput])
    assert (ask.ssh_keys, ask.start) == (keys, False)
    await handle.result()


# ------------------------------------------------------------------------------ GET boxes, admission


async def test_get_boxes_shows_the_options(api: httpx.AsyncClient, engine: Engine) -> None:
    load_admin_data(engine, with_box({"boxes": []}))
    response = await api.get(f"{API}/boxes", headers=auth(ALICE))
    assert response.status_code == 200
    boxes = {box["id"]: box for box in response.json()["data"]["boxes"]}
    assert boxes["box-ready"] == {
        "id": "box-ready",
        "name": "Ready box",
        "template": "Ubuntu 24.04",
        "start": True,
        "cloud_init": True,  # whether set: the keys and the user are not shown
        "pool": "course-101",
        "tags": ["course-101", "lab"],
        "network": {"bridge": "vmbr1", "vlan": 42},
    }
    assert boxes[BOX]["cloud_init"] is False and boxes[BOX]["network"] is None


def test_admission_hands_the_box_options_to_the_workflow(settings: Settings, engine: Engine) -> None:
    load_admin_data(engine, with_box({"boxes": []}))
    # As a worker runs it: an attempt that began now, with the workflow's start-to-close.
    worker = ActivityEnvironment()
    worker.info = replace(worker.info, started_time=datetime.now(UTC), start_to_close_timeout=ADMIT_ATTEMPT)
    admission = AdmissionActivities(
        DbActivities(engine, Limits(per_node=0, per_storage=0), tell_slot_granted=_never_called),
        PveActivities(PveClient(settings), "NFS"),
    )
    ask = CreateFromBoxInput(
        username="alice", box_id="box-ready", name="ready", target="pve2", cpu_cores=1, memory_mb=512, disk_gb=20
    )

    admitted = worker.run(admission.admit, AdmitInput(task_id="clone-ready-" + secrets.token_hex(4), request=ask))

    assert admitted.box == BoxOptions(
        start=True,
        wait_for_ip_seconds=300,
        cloud_init=CloudInit(user="ubuntu", ssh_keys=[KEY, RSA_KEY], ipconfig0="ip=dhcp", nameserver="192.0.2.53"),
        pool="course-101",
        tags=["course-101", "lab"],
        network=Network(bridge="vmbr1", vlan=42),
    )
    plain_ask = replace(ask, box_id=BOX)
    plain = worker.run(admission.admit, AdmitInput(task_id="clone-plain-" + secrets.token_hex(4), request=plain_ask))
    assert plain.box == BoxOptions()


async def _never_called(task_id: str) -> bool:
    raise AssertionError(task_id)
