"""Free VMIDs: the service picks the lowest VMID that PVE shows free (and that no other creation holds),
instead of `/cluster/nextid`, which answers the same id to concurrent callers."""

from __future__ import annotations

FIRST_VMID = 100
LAST_VMID = 999_999_999
MAX_FREE_RANGES = 256  # a fragmented cluster still offers thousands of free VMIDs in these


def free_vmid_ranges(taken: set[int]) -> list[list[int]]:
    """The gaps between the VMIDs in use, as inclusive [first, last] ranges from 100 up to PVE's maximum."""
    ranges: list[list[int]] = []
    start = FIRST_VMID
    for vmid in sorted(v for v in taken if v >= FIRST_VMID):
        if vmid > start:
            ranges.append([start, vmid - 1])
            if len(ranges) == MAX_FREE_RANGES:
                return ranges
        start = max(start, vmid + 1)
    ranges.append([start, LAST_VMID])
    return ranges
