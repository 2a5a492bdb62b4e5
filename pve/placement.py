"""Where a lab's VMs go: spread evenly over the target nodes, within what each node can hold.

Pure functions over the node entries of PVE's `cluster/resources` (`node`, `status`, `mem`, `maxmem`), so that
they are tested without a cluster."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

MIB = 1024 * 1024


def online_nodes(resources: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """The online nodes and the memory each has free (MiB), from cluster/resources."""
    return {
        str(r["node"]): max(0, int(r.get("maxmem") or 0) - int(r.get("mem") or 0)) // MIB
        for r in resources
        if r.get("type") == "node" and r.get("status") == "online"
    }


def spread(count: int, targets: list[str], free_mb: Mapping[str, int], memory_mb: int) -> list[str]:
    """A node for each of `count` VMs of `memory_mb`: each VM goes to the target with the fewest of the lab's VMs
    so far among those whose free memory still holds it (ties: the most memory left, then the order of
    `targets`), so the VMs are spread evenly and no node is given more than it holds while another has room.
    When no target has room left, the rest are spread evenly all the same: a VM takes memory only once it
    runs, and PVE lets a node's VMs promise more memory than it has (the operator's choice)."""
    placed = dict.fromkeys(targets, 0)
    left = {node: free_mb.get(node, 0) for node in targets}
    nodes = []
    for _ in range(count):
        with_room = [node for node in targets if left[node] >= memory_mb] or targets
        node = min(with_room, key=lambda n: (placed[n], -left[n], targets.index(n)))
        placed[node] += 1
        left[node] -= memory_mb
        nodes.append(node)
    return nodes


def other_target(targets: list[str], failed: str, free_mb: Mapping[str, int]) -> str:
    """Where to try again a VM whose creation failed on `failed`: the online target other than it with the most
    free memory; the same one when the lab has no other (or none of the others is online)."""
    others = [node for node in targets if node != failed and node in free_mb]
    if not others:
        return failed
    return max(others, key=lambda n: (free_mb[n], -targets.index(n)))
