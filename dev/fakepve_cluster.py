"""A small fake PVE cluster for `make run`, the tests and the benchmarks: two nodes, shared NFS storage and
an Ubuntu template VM. Development tooling only: fakepve is AGPL and the product never imports it."""

from __future__ import annotations

import time
from typing import Any

from pve.vm_options import agent_enabled

TEMPLATE_VMID = 9000
TEMPLATE_NODE = "pve1"
TEMPLATE_DISK_GB = 10
NODES = ("pve1", "pve2")


def seed(pve: Any, boot_seconds: float = 0.0) -> Any:
    """Add the nodes, the shared `NFS` storage and the template to a FakePve; returns the template VM. Its image
    is taken to have the guest agent installed: a VM of it answers the agent `boot_seconds` (real
    seconds) after it started."""
    with_guest_agents(pve, boot_seconds)
    for node in NODES:
        pve.add_node(node)
    pve.storages["NFS"] = {
        "type": "nfs",
        "active": 1,
        "content": "images,rootdir,iso",
        "files": set(),
        "shared": 1,
        "server": "10.0.0.10",
        "export": "/export/pve",
        "path": "/mnt/pve/NFS",
    }
    return pve.add_vm(
        TEMPLATE_VMID,
        "ubuntu-24.04-tpl",
        node=TEMPLATE_NODE,
        template=True,
        config={
            "cores": 1,
            "memory": 1024,
            "scsi0": f"NFS:{TEMPLATE_VMID}/base-{TEMPLATE_VMID}-disk-0.qcow2,size={TEMPLATE_DISK_GB}G",
            "scsihw": "virtio-scsi-single",
            "boot": "order=scsi0",
            "net0": "virtio=BC:24:11:00:00:01,bridge=vmbr0,firewall=1",
            "ostype": "l26",
            "agent": "1",  # the guest agent enabled, as a template of a ready box needs
            "template": 1,
        },
    )


def with_guest_agents(pve: Any, boot_seconds: float) -> None:
    """fakepve answers a VM's guest agent only once `vm.agent` is set, and a clone starts with none: here a
    running VM whose config enables the agent gets one `boot_seconds` after its start, as a
    guest that boots and starts its agent would. Until then the agent calls answer PVE's 500 as before."""
    answer = pve._agent_call
    pve.guest_boot_seconds = boot_seconds  # a test may change it

    async def agent_call(match: Any, values: dict[str, Any]) -> Any:
        vm = pve.find(values["node"], values["vmid"])
        booted = vm.started_at is not None and time.time() - vm.started_at >= pve.guest_boot_seconds
        if vm.agent is None and vm.status == "running" and booted and agent_enabled(vm.config.get("agent")):
            vm.agent = {}
        return await answer(match, values)

    pve._agent_call = agent_call
