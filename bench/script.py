"""The hand-written script the service is measured against: the same PVE calls, one after another, with
proxmoxer and nothing else (no Temporal, no database, no checks, no retries)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from proxmoxer import ProxmoxAPI

from dev.fakepve_cluster import TEMPLATE_NODE, TEMPLATE_VMID

POLL_SECONDS = 0.25


@dataclass
class ScriptTarget:
    host: str
    port: int
    ca_file: str
    user: str = "root@pam"
    password: str = "secret"


def wait_task(api: Any, upid: str) -> int:
    """Poll the task's status every 0.25 s until it has stopped; returns how many looks it took."""
    node = upid.split(":")[1]
    looks = 0
    while True:
        looks += 1
        status = api.nodes(node).tasks(upid).status.get()
        if status.get("status") == "stopped":
            if status.get("exitstatus") != "OK":
                raise RuntimeError(f"PVE task {upid} failed: {status.get('exitstatus')}")
            return looks
        time.sleep(POLL_SECONDS)


def create_vm(
    pve: ScriptTarget,
    newid: int,
    name: str,
    target: str,
    storage: str,
    cores: int,
    memory_mb: int,
    disk_gb: int,
) -> None:
    """Log in, full-clone the template onto `storage` and `target`, set cores and memory, grow the disk."""
    api = ProxmoxAPI(pve.host, port=pve.port, user=pve.user, password=pve.password, verify_ssl=pve.ca_file)
    upid = (
        api.nodes(TEMPLATE_NODE)
        .qemu(TEMPLATE_VMID)
        .clone.post(newid=newid, name=name, full=1, target=target, storage=storage)
    )
    wait_task(api, upid)
    upid = api.nodes(target).qemu(newid).config.post(cores=cores, memory=memory_mb)
    wait_task(api, upid)
    upid = api.nodes(target).qemu(newid).resize.put(disk="scsi0", size=f"{disk_gb}G")
    if upid:
        wait_task(api, upid)
