"""VMs on PVE: find one by VMID, read its config, and remove one. Synchronous, on a PveClient. Whether a VM may
be removed (its owner, its locks) is the caller's to decide first."""

from __future__ import annotations

from typing import Any

from pve.client import PveClient, PveError
from pve.tasks import wait_until_done


def guests(pve: PveClient) -> list[dict[str, Any]]:
    """Every VM and container in the cluster (`type` qemu or lxc), with its node, status and lock."""
    return [dict(r) for r in pve.get("cluster/resources", type="vm")]


def find_vm(pve: PveClient, vmid: int) -> dict[str, Any] | None:
    """The guest with this VMID, VM or container, wherever it runs; None if there is none."""
    return next((r for r in guests(pve) if int(r["vmid"]) == vmid), None)


def vm_config(pve: PveClient, node: str, vmid: int) -> dict[str, Any] | None:
    """The VM's config; None if it no longer exists. PveError/PveUnavailable if it cannot be read."""
    try:
        return dict(pve.get_expecting(f"nodes/{node}/qemu/{vmid}/config", vm_gone))
    except PveError as exc:
        if vm_gone(exc):
            return None
        raise


def vm_gone(exc: PveError) -> bool:
    """PVE's answer for a VM that does not exist (any more)."""
    return "does not exist" in exc.message


def stop_and_destroy(pve: PveClient, node: str, vmid: int, *, running: bool, limit: float) -> None:
    """Stop the VM at once if it runs (no shutdown: it is being thrown away), then destroy it with its disks,
    also those its config no longer names. Waits up to `limit` seconds for each task (see wait_until_done)."""
    if running:
        upid = pve.post(f"nodes/{node}/qemu/{vmid}/status/stop")
        if upid:
            wait_until_done(pve, str(upid), limit)
    upid = pve.delete(f"nodes/{node}/qemu/{vmid}", purge=1, **{"destroy-unreferenced-disks": 1})
    if upid:
        wait_until_done(pve, str(upid), limit)
