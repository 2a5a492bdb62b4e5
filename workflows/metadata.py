"""What the Web UI shows of a run: its static summary (one line in the list of runs) and static details (the
request, as markdown), set by whoever starts the run, and the current details a creation keeps true while it
runs (`workflow.set_current_details`). Plain functions: the API, the start helpers and the workflows use them.

No heavy imports: workflow code imports this module."""

from __future__ import annotations

from payloads import CreateFromBoxInput, DeleteVmInput, LabInput, PowerVmInput


def creation_summary(input: CreateFromBoxInput) -> str:
    """e.g. "web-01 · alice · box ubuntu → pve2/NFS · 2 cores, 2048 MB, 20 GB"."""
    where = f"{input.target}/{input.storage}" if input.storage else input.target
    return (
        f"{input.name} · {input.username} · box {input.box_id} → {where} · "
        f"{cores(input.cpu_cores)}, {input.memory_mb} MB, {input.disk_gb} GB"
    )


def creation_details(input: CreateFromBoxInput) -> str:
    return _markdown(
        {
            "owner": input.username,
            "box": input.box_id,
            "name": input.name,
            "target": input.target,
            "storage": input.storage or "the default",
            "cores": input.cpu_cores,
            "memory": f"{input.memory_mb} MB",
            "disk": f"{input.disk_gb} GB",
        }
    )


def lab_summary(input: LabInput) -> str:
    """e.g. "lab web x 12 · alice · box ubuntu → pve1, pve2 · 2 cores, 2048 MB, 20 GB each"."""
    where = ", ".join(input.targets) if input.targets else "every online node"
    return (
        f"lab {input.name} x {input.count} · {input.username} · box {input.box_id} → {where} · "
        f"{cores(input.cpu_cores)}, {input.memory_mb} MB, {input.disk_gb} GB each"
    )


def lab_details(input: LabInput) -> str:
    return _markdown(
        {
            "owner": input.username,
            "box": input.box_id,
            "names": f"{input.name}-01 .. ({input.count} VMs)",
            "targets": ", ".join(input.targets) if input.targets else "every online node",
            "storage": input.storage or "the default",
            "cores": input.cpu_cores,
            "memory": f"{input.memory_mb} MB",
            "disk": f"{input.disk_gb} GB",
        }
    )


def deletion_summary(input: DeleteVmInput, vm_name: str) -> str:
    """e.g. "delete VM 101 (web-01) · alice"."""
    return f"delete VM {input.vmid} ({vm_name}) · {input.username}"


def deletion_details(input: DeleteVmInput, vm_name: str, node: str) -> str:
    return _markdown({"owner": input.username, "VM": input.vmid, "name": vm_name, "node": node})


def power_summary(input: PowerVmInput) -> str:
    """e.g. "reboot VM 101 · alice"."""
    return f"{input.action} VM {input.vmid} · {input.username}"


def power_details(input: PowerVmInput, vm_name: str, node: str) -> str:
    return _markdown({"owner": input.username, "action": input.action, "VM": input.vmid, "name": vm_name, "node": node})


def _markdown(fields: dict[str, object]) -> str:
    return "\n".join(f"- **{key}**: {value}" for key, value in fields.items())


def cores(count: int) -> str:
    return "1 core" if count == 1 else f"{count} cores"
