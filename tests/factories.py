"""Test data: the admin file every end-to-end test loads, tokens, and request bodies."""

from __future__ import annotations

from typing import Any

from dev.fakepve_cluster import TEMPLATE_VMID

ALICE = "alice-session-token-0123456789abcdef"
BOB = "bob-session-token-0123456789abcdef00"
CAROL = "carol-session-token-0123456789abcdef"
BOX = "60d5ec49f1b2c8a1e4d3b2a1"

ADMIN_DATA: dict[str, Any] = {
    "plans": [
        {
            "id": "small",
            "name": "Small",
            "per_vm": {"cores": 4, "memory_mb": 8192, "disk_gb": 100},
            "total": {"cores": 8, "memory_mb": 16384, "disk_gb": 200, "vms": 5},
        }
    ],
    "users": [
        {"username": "alice", "plan": "small", "tokens": [ALICE]},
        {"username": "bob", "plan": "small", "tokens": [BOB]},
        {"username": "carol", "plan": None, "tokens": [CAROL]},
    ],
    "templates": [
        {
            "id": "tpl-ubuntu",
            "name": "Ubuntu 24.04",
            "node": "pve1",
            "vmid": TEMPLATE_VMID,
            "public": False,
            "allowed_users": ["alice", "carol"],
        },
        {"id": "tpl-gone", "name": "Deleted on PVE", "node": "pve1", "vmid": 9999, "public": True},
    ],
    "boxes": [
        {"id": BOX, "name": "Ubuntu box", "template": "tpl-ubuntu"},
        {"id": "box-orphan", "name": "Box without template", "template": "tpl-undefined"},
        {"id": "box-gone", "name": "Template VM deleted on PVE", "template": "tpl-gone"},
    ],
}


def body(**overrides: Any) -> dict[str, Any]:
    """A createFromBoxTemplate request that fits alice's plan."""
    request: dict[str, Any] = {
        "box_id": BOX,
        "name": "my-new-vm-from-box",
        "target": "pve2",
        "cpuCores": 2,
        "memorySize": 2048,
        "diskSize": 20,
    }
    request.update(overrides)
    return {k: v for k, v in request.items() if v is not ...}


def auth(token: str = ALICE) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
