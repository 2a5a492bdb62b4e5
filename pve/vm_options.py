"""The values a VM's config takes to be ready to use: its tags, its first network device, its cloud-init and a
cloud-init drive, each written the way PVE reads it back (qemu-server's PVE/QemuServer.pm and PVE/API2/Qemu.pm).
Plain functions of config values: the caller reads the config and sends the write."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote

# PVE splits a tag list on ';', ',' and spaces, and writes it back joined by ';'.
TAG_SEPARATORS = re.compile(r"[;, ]+")
# The slots a cloud-init drive may take, PVE's usual one first.
CLOUDINIT_SLOTS = ("ide2", *(f"ide{n}" for n in (0, 1, 3)), *(f"scsi{n}" for n in range(31)))
DRIVE_KEY = re.compile(r"(ide|sata|scsi|virtio)\d+|efidisk0|tpmstate0")
# PVE's rule for VM names (format `dns-name`): dot-separated labels of letters, digits and hyphens that start
# and end with a letter or digit. Matched whole (fullmatch, \Z): `$` would also match before a final newline.
VM_NAME = re.compile(r"(?=.{1,128}\Z)[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*")


def valid_vm_name(name: str) -> bool:
    """A name PVE takes for a VM (the API refuses others with the seed's message before anything starts)."""
    return VM_NAME.fullmatch(name) is not None


def tags_of(value: Any) -> set[str]:
    """The tags of a VM's `tags` value (config or cluster resource), lower-cased as PVE compares them."""
    return {t for t in TAG_SEPARATORS.split(str(value or "").lower()) if t}


def tag_list(template_tags: str | None, *more: Iterable[str]) -> str:
    """The template's own tags with `more` added, each once (PVE compares tags without case), sorted as PVE
    shows them."""
    seen: dict[str, str] = {}
    for tag in [*TAG_SEPARATORS.split(template_tags or ""), *(t for group in more for t in group)]:
        if tag:
            seen.setdefault(tag.lower(), tag)
    return ";".join(sorted(seen.values(), key=str.lower))


def net_device(current: str | None, bridge: str | None, vlan: int | None) -> str:
    """`current` (e.g. `virtio=BC:24:11:00:00:01,bridge=vmbr0,firewall=1`) on `bridge` and VLAN `vlan`, its model,
    MAC address and other options kept; None of either keeps what it has. A VM without the device gets a
    virtio one (PVE then picks its MAC address)."""
    parts = [p for p in (current or "virtio").split(",") if p]
    options = {p.partition("=")[0]: p for p in parts[1:]}
    if bridge is not None:
        options["bridge"] = f"bridge={bridge}"
    if vlan is not None:
        options["tag"] = f"tag={vlan}"
    return ",".join([parts[0], *options.values()])


def encode_ssh_keys(keys: Iterable[str]) -> str:
    """The `sshkeys` value: the keys one a line, percent-encoded whole, as PVE decodes it (a space as %20 and a
    `+` as %2B; PVE's URI decoding would read a bare `+` as a space and break the key)."""
    return quote("\n".join(keys), safe="")


def cloudinit_drive(config: Mapping[str, Any]) -> str | None:
    """The key of the VM's cloud-init drive, None if it has none."""
    for key, value in config.items():
        # `NFS:vm-101-cloudinit`, `local:101/vm-101-cloudinit.qcow2`, or `NFS:cloudinit` as a write asks for it.
        if DRIVE_KEY.fullmatch(key) and "cloudinit" in str(value).split(",")[0].split(":", 1)[-1]:
            return key
    return None


def free_cloudinit_slot(config: Mapping[str, Any]) -> str | None:
    """Where a cloud-init drive may go: ide2 if free, else the first free IDE or SCSI slot."""
    return next((key for key in CLOUDINIT_SLOTS if key not in config), None)


def ready_settings(
    config: Mapping[str, Any],
    *,
    tags: Iterable[str],
    network: Mapping[str, Any],
    cloud_init: Mapping[str, Any] | None,
    ssh_keys: Iterable[str],
    storage: str,
) -> dict[str, Any] | None:
    """The config keys that make the VM of `config` ready to use: its tags with `tags` added; `net0` on the
    network's `bridge` and `vlan` (when either is set); with `cloud_init` (`user`, `ssh_keys`, `ipconfig0`,
    `nameserver`) or `ssh_keys`, cloud-init, and a cloud-init drive on `storage` if the VM has none.
    None: no slot is free for that drive."""
    settings: dict[str, Any] = {"tags": tag_list(config.get("tags"), tags)}
    bridge, vlan = network.get("bridge"), network.get("vlan")
    if bridge is not None or vlan is not None:
        settings["net0"] = net_device(config.get("net0"), bridge, vlan)
    asked = cloud_init or {}
    keys = list(dict.fromkeys([*(asked.get("ssh_keys") or ()), *ssh_keys]))
    if cloud_init is None and not keys:
        return settings
    for key, option in (("user", "ciuser"), ("ipconfig0", "ipconfig0"), ("nameserver", "nameserver")):
        if asked.get(key):
            settings[option] = asked[key]
    if keys:
        settings["sshkeys"] = encode_ssh_keys(keys)
    if cloudinit_drive(config) is None:
        slot = free_cloudinit_slot(config)
        if slot is None:
            return None
        settings[slot] = f"{storage}:cloudinit"
    return settings


def agent_enabled(value: Any) -> bool:
    """The `agent` option (`1`, or `enabled=1,fstrim_cloned_disks=1`): whether the guest agent is on."""
    first = str(value or "0").split(",")[0]
    return first.partition("=")[2] == "1" if "=" in first else first == "1"
