"""What the QEMU guest agent tells of a running VM: its network addresses (`agent/network-get-interfaces`)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any


def addresses(interfaces: Iterable[Mapping[str, Any]]) -> list[str]:
    """The guest's addresses others can reach it by: loopback and link-local ones left out, IPv4 first, each
    once, in the order the agent lists them."""
    found: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for interface in interfaces:
        for entry in interface.get("ip-addresses") or ():
            try:
                address = ipaddress.ip_address(str(entry.get("ip-address", "")).split("%")[0])
            except ValueError:
                continue
            if not (address.is_loopback or address.is_link_local or address.is_unspecified) and address not in found:
                found.append(address)
    return [str(a) for a in sorted(found, key=lambda a: a.version)]  # sorted() is stable: IPv4 first
