"""Disk sizes in a VM's config: which disk it boots from and how big it is."""

from __future__ import annotations

import math
import re
from typing import Any

DISK_KEY = re.compile(r"^(scsi|virtio|sata|ide)\d+$")
SIZE = re.compile(r"(?:^|,)size=(\d+(?:\.\d+)?)([KMGT]?)(?:,|$)")
GIB_PER_UNIT = {"K": 1 / 1024**2, "M": 1 / 1024, "G": 1.0, "T": 1024.0, "": 1 / 1024**3}


def disk_gb(drive: str) -> int:
    """Size of a drive property string (`NFS:vm-100-disk-0,size=32G`) in whole GiB, rounded up."""
    match = SIZE.search(drive)
    if not match:
        return 0
    return math.ceil(float(match.group(1)) * GIB_PER_UNIT[match.group(2)])


def boot_disk(config: dict[str, Any]) -> tuple[str, int] | None:
    """The disk the VM boots from, and its size: the first disk of `boot: order=...`, else the first disk."""
    disks = {
        key: str(value)
        for key, value in config.items()
        if DISK_KEY.match(key) and "media=cdrom" not in str(value) and str(value) != "none"
    }
    order = str(config.get("boot", ""))
    candidates = order[len("order=") :].split(";") if order.startswith("order=") else []
    if config.get("bootdisk"):
        candidates.append(str(config["bootdisk"]))
    candidates += sorted(disks)
    for key in candidates:
        if key in disks:
            return key, disk_gb(disks[key])
    return None
