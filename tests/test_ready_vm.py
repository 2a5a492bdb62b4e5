"""A VM ready to use, end to end against fakepve: a box's cloud-init, pool, tags and network written as PVE
reads them, the VM started and its guest agent's address in the task and in GET vms; a start that fails is
cleaned up; a box without options makes a stopped VM with nothing more than before (its template's tags kept)."""

from __future__ import annotations

import base64
import re
from typing import Any
from urllib.parse import unquote

import httpx
import pytest
from sqlalchemy import Engine

from db.load import load_admin_data
from db.models import RELEASED
from dev.fakepve_cluster import TEMPLATE_VMID
from payloads import MSG_CONFIGURE_FAILED, MSG_CREATED
from tests.conftest import created_vms, reservations, vm_records
from tests.factories import auth, body
from tests.waiting import until_async

CREATE = "/api/v1/vm/manage/createFromBoxTemplate"
READY_BOX = "box-ready"
MAC = "BC:24:11:AB:CD:EF"  # the MAC address the clone's NIC gets
ADDRESS = "192.0.2.10"  # what fakepve's guest agent reports for eth0


def ssh_key(fill: int, comment: str) -> str:
    """An ed25519 public key line whose base64 holds `+` and `/` (0xfb bytes), with a comment of several words."""
    blob = b"".join(len(part).to_bytes(4, "big") + part for part in (b"ssh-ed25519", bytes([fill]) * 32))
    return f"ssh-ed25519 {base64.b64encode(blob).decode()} {comment}"


BOX_KEY = ssh_key(0xFB, "alice laptop")
REQUEST_KEY = ssh_key(0xFE, "ci runner+1@example.org")
assert "+" in BOX_KEY and "/" in BOX_KEY


def ready_box(**changes: Any) -> dict[str, Any]:
    box = {
        "id": READY_BOX,
        "name": "Ready box",
        "template": "tpl-ubuntu",
        "start": True,
        "wait_for_ip_seconds": 30,
        "cloud_init": {"user": "ubuntu", "ssh_keys": [BOX_KEY], "ipconfig0": "ip=dhcp", "nameserver": "192.0.2.53"},
        "pool": "course-101",
        "tags": ["course-101"],
        "network": {"bridge": "vmbr1", "vlan": 42},
    }
    return box | changes


@pytest.fixture(autouse=True)
def template_tagged(pve: Any) -> None:
    """The template has a tag of its own, which its clones keep."""
    pve.vm(TEMPLATE_VMID).config["tags"] = "ubuntu"


@pytest.fixture
def ready(engine: Engine, pve: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ready box, its pool on PVE, and a known MAC address for the clone's NIC (fakepve draws a fresh one)."""
    load_admin_data(engine, {"boxes": [ready_box()]})
    pve.pools["course-101"] = set()
    monkeypatch.setattr("fakepve.qemu.random_mac", lambda: MAC)


async def create(api: httpx.AsyncClient, **fields: Any) -> httpx.Response:
    return await api.post(CREATE, json=body(**fields), headers=auth(), params={"wait": 60})


async def task(api: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    return (await api.get(f"/api/v1/vm/manage/tasks/{task_id}", headers=auth())).json()["data"]  # type: ignore[no-any-return]


async def status_of(api: httpx.AsyncClient, task_id: str) -> str:
    return str((await task(api, task_id))["status"])


def tags_of(vm: Any) -> set[str]:
    return set(re.split(r"[;, ]", vm.config["tags"]))


@pytest.mark.usefixtures("worker", "ready")
async def test_a_ready_box_makes_a_running_vm_with_its_cloud_init_network_pool_tags_and_address(
    api: httpx.AsyncClient, pve: Any, engine: Engine
) -> None:
    response = await create(api, box_id=READY_BOX, sshKeys=[REQUEST_KEY])
    assert response.json()["message"] == MSG_CREATED, response.text
    task_id = response.json()["data"]["task_id"]

    [vm] = created_vms(pve)
    config = vm.config
    assert (config["ciuser"], config["ipconfig0"], config["nameserver"]) == ("ubuntu", "ip=dhcp", "192.0.2.53")
    # PVE keeps the keys URL-encoded and decodes them once into authorized_keys: spaces and `+` survive.
    assert "%20" in config["sshkeys"] and "%2B" in config["sshkeys"] and "+" not in config["sshkeys"]
    assert unquote(config["sshkeys"]).split("\n") == [BOX_KEY, REQUEST_KEY]
    assert config["ide2"] == "NFS:cloudinit"  # the template has no cloud-init drive: one on the clone's storage
    assert tags_of(vm) == {"ubuntu", "course-101", "pve-boxes"}  # the template's own tag kept
    assert config["net0"] == f"virtio={MAC},bridge=vmbr1,firewall=1,tag=42"  # model, MAC and firewall kept
    assert pve.pools["course-101"] == {vm.vmid}
    assert vm.status == "running"

    state = await task(api, task_id)
    assert (state["status"], state["step"], state["ip_addresses"]) == ("succeeded", "done", [ADDRESS])
    listed = (await api.get("/api/v1/vm/manage/vms", headers=auth())).json()["data"]["vms"]
    assert [v["ip_addresses"] for v in listed] == [[ADDRESS]]


@pytest.mark.usefixtures("worker", "ready")
async def test_the_address_is_awaited_while_the_guest_boots_and_its_absence_is_no_failure(
    api: httpx.AsyncClient, pve: Any, engine: Engine
) -> None:
    pve.guest_boot_seconds = 0.5  # the agent answers 500 until then
    booted = await create(api, box_id=READY_BOX)
    assert booted.status_code == 200, booted.text
    assert (await task(api, booted.json()["data"]["task_id"]))["ip_addresses"] == [ADDRESS]

    load_admin_data(engine, {"boxes": [ready_box(wait_for_ip_seconds=1)]})
    pve.guest_boot_seconds = 60.0  # longer than the box waits
    silent = await create(api, box_id=READY_BOX, name="silent-vm")
    assert silent.json()["message"] == MSG_CREATED, silent.text
    state = await task(api, silent.json()["data"]["task_id"])
    assert (state["status"], state["ip_addresses"]) == ("succeeded", [])
    assert [vm.status for vm in created_vms(pve)] == ["running", "running"]


@pytest.mark.usefixtures("worker", "ready")
async def test_a_start_that_fails_is_a_configuration_failure_and_is_cleaned_up(
    api: httpx.AsyncClient, pve: Any, engine: Engine
) -> None:
    pve.fail("POST", "/nodes/pve2/qemu/100/status/start", error="qemu_exited_code")  # the start task fails

    response = await api.post(CREATE, json=body(box_id=READY_BOX), headers=auth())
    assert response.status_code == 200, response.text  # admitted: the start fails afterwards
    task_id = response.json()["data"]["task_id"]
    await until_async(lambda: status_of(api, task_id), "failed")

    state = await task(api, task_id)
    assert (state["step"], state["result_code"], state["result_message"]) == ("done", 500, MSG_CONFIGURE_FAILED)
    assert created_vms(pve) == []
    assert vm_records(engine) == []
    assert [r.state for r in reservations(engine)] == [RELEASED]
    quota = (await api.get("/api/v1/vm/manage/quota", headers=auth())).json()["data"]
    assert quota["used"] == {"cores": 0, "memory_mb": 0, "disk_gb": 0, "vms": 0}


@pytest.mark.usefixtures("worker")
async def test_a_box_without_options_makes_a_stopped_vm_as_before_keeping_the_templates_tags(
    api: httpx.AsyncClient, pve: Any
) -> None:
    response = await create(api)
    assert response.json()["message"] == MSG_CREATED, response.text

    [vm] = created_vms(pve)
    assert vm.status == "stopped"
    assert not {"ciuser", "sshkeys", "ipconfig0", "nameserver", "ide2"} & set(vm.config)
    assert tags_of(vm) == {"ubuntu", "pve-boxes"}
    assert re.fullmatch(r"virtio=[0-9A-F:]{17},bridge=vmbr0,firewall=1", vm.config["net0"])
    assert all(vm.vmid not in members for members in pve.pools.values())
    state = await task(api, response.json()["data"]["task_id"])
    assert (state["step"], state["ip_addresses"]) == ("done", [])


@pytest.mark.usefixtures("worker")
async def test_keys_of_the_request_on_a_box_without_cloud_init_are_written_with_a_drive(
    api: httpx.AsyncClient, pve: Any
) -> None:
    response = await create(api, sshKeys=[REQUEST_KEY])
    assert response.json()["message"] == MSG_CREATED, response.text

    [vm] = created_vms(pve)
    assert unquote(vm.config["sshkeys"]).split("\n") == [REQUEST_KEY]
    assert vm.config["ide2"] == "NFS:cloudinit"
    assert "ciuser" not in vm.config
    assert vm.status == "stopped"
