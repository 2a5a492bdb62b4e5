"""A small fake PVE cluster for `make run`, the tests and the benchmarks: two nodes, shared NFS storage and
an Ubuntu template VM. Development tooling only: fakepve is AGPL and the product never imports it."""

from __future__ import annotations

from typing import Any

TEMPLATE_VMID = 9000
TEMPLATE_NODE = "pve1"
TEMPLATE_DISK_GB = 10
NODES = ("pve1", "pve2")


def seed(pve: Any) -> Any:
    """Add the nodes, the shared `NFS` storage and the template to a FakePve; returns the template VM."""
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
            "net0": "virtio=BC:24:11:00:00:01,bridge=vmbr0",
            "ostype": "l26",
            "template": 1,
        },
    )
