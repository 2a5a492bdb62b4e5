"""Where a lab's VMs go (pve/placement.py): pure functions over cluster/resources' node entries."""

from __future__ import annotations

from collections import Counter
from typing import Any

from pve.placement import MIB, online_nodes, other_target, spread

GIB_MB = 1024


def node(name: str, free_mb: int, status: str = "online") -> dict[str, Any]:
    return {"type": "node", "node": name, "status": status, "maxmem": (free_mb + 2048) * MIB, "mem": 2048 * MIB}


def test_online_nodes_and_their_free_memory() -> None:
    resources = [node("pve1", 6144), node("pve2", 1024), node("pve3", 0, status="offline"), {"type": "qemu"}]
    assert online_nodes(resources) == {"pve1": 6144, "pve2": 1024}


def test_vms_are_spread_evenly_when_every_node_holds_them() -> None:
    nodes = spread(12, ["pve1", "pve2", "pve3"], {"pve1": 64 * GIB_MB, "pve2": 64 * GIB_MB, "pve3": 64 * GIB_MB}, 2048)
    assert Counter(nodes) == {"pve1": 4, "pve2": 4, "pve3": 4}
    assert nodes[:3] == ["pve1", "pve2", "pve3"]  # taking turns, in the order of the targets


def test_a_node_is_not_given_more_than_it_holds_while_another_has_room() -> None:
    # pve2 holds two VMs of 2 GB: the other VMs go to pve1, which holds them all.
    nodes = spread(8, ["pve1", "pve2"], {"pve1": 32 * GIB_MB, "pve2": 4 * GIB_MB}, 2048)
    assert Counter(nodes) == {"pve1": 6, "pve2": 2}


def test_when_no_node_has_room_left_the_rest_are_spread_evenly() -> None:
    nodes = spread(6, ["pve1", "pve2"], {"pve1": 2 * GIB_MB, "pve2": 0}, 2048)
    assert nodes[0] == "pve1"  # the only one with room for one
    assert Counter(nodes) == {"pve1": 3, "pve2": 3}


def test_a_failed_vm_goes_to_the_other_online_target_with_the_most_free_memory() -> None:
    free = {"pve1": 1024, "pve2": 8192, "pve3": 4096}
    assert other_target(["pve1", "pve2", "pve3"], "pve2", free) == "pve3"
    assert other_target(["pve1", "pve2"], "pve1", free) == "pve2"
    assert other_target(["pve1"], "pve1", free) == "pve1"  # one target: the same one
    assert other_target(["pve1", "pve4"], "pve1", free) == "pve1"  # pve4 is not online
