"""A box's options, which make its VMs ready to use (the contract's "Boxes carry what makes a VM ready to use"):
how `boxctl load` checks them, and the form the database hands them on in.

Checked by PVE's own rules at load, so that a box never names what PVE would refuse at configure, after a full
clone, when all a user can be told is "configuration failed". The messages never repeat the value: the file
may hold secrets next to it, and db/load.py's messages never echo input.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from sqlalchemy import Row

from db.models import Box

# PVE's `pve-tag` (lowercase: PVE lowercases tags, a box's tag is compared with the VM's as written).
TAG = re.compile(r"[a-z0-9_][a-z0-9_+.-]*")
# PVE's `pve-poolid`: up to three levels of nested pools.
POOL = re.compile(r"[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+){0,2}")
# PVE's `pve-bridge-id`, within Linux's 15 characters of an interface name.
BRIDGE = re.compile(r"[A-Za-z0-9_.-]{1,15}")
# A POSIX-ish login name: what cloud-init's `ciuser` becomes.
USER = re.compile(r"[a-z_][a-z0-9_.-]{0,31}")
# The key types OpenSSH (and PVE's validate_ssh_public_keys) take in authorized_keys.
SSH_KEY_TYPES = frozenset(
    {
        "ssh-ed25519",
        "ssh-rsa",
        "ssh-dss",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    }
)
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# PVE's `ipconfig0` keys: the format of each value, and the key it needs beside it.
_IPCONFIG = {"ip": ("dhcp", "manual"), "gw": None, "ip6": ("dhcp", "auto", "manual"), "gw6": None}
_IPCONFIG_NEEDS = {"gw": "ip", "gw6": "ip6"}


def ssh_key_problem(key: Any) -> str | None:
    """Why `key` is not shaped as one OpenSSH public key line (`type key [comment]`), or None when it is. The key
    itself is PVE's to check (it runs ssh-keygen on each line, and a configuration it refuses is cleaned up):
    decoding it here would refuse the contract's own example, `ssh-ed25519 AAAAC3Nz... a@b`."""
    if not isinstance(key, str):
        return "is not a string"
    if CONTROL_CHARACTERS.search(key):
        return "is not one line of printable characters"
    kind, _, rest = key.partition(" ")
    if kind not in SSH_KEY_TYPES:
        return f"does not start with a key type ({', '.join(sorted(SSH_KEY_TYPES))})"
    if not rest.partition(" ")[0]:
        return "has no key after its type"
    return None


def _ssh_key(value: str) -> str:
    if (problem := ssh_key_problem(value)) is not None:
        raise ValueError(f"{problem}; expected an OpenSSH public key line such as 'ssh-ed25519 AAAA... me@host'")
    return value


def _ipconfig(value: str) -> str:
    seen: dict[str, str] = {}
    for item in value.split(","):
        key, eq, setting = item.partition("=")
        if key not in _IPCONFIG or not eq or key in seen:
            raise ValueError("must be PVE's ipconfig: ip=dhcp, or ip=CIDR,gw=IP, and/or ip6=..., gw6=..., once each")
        words = _IPCONFIG[key]
        version = 6 if key.endswith("6") else 4
        if setting not in (words or ()) and not _is_address(setting, version=version, network=words is not None):
            expected = f"{', '.join(words)} or an IPv{version} CIDR" if words else f"an IPv{version} address"
            raise ValueError(f"{key} must be {expected}")
        seen[key] = setting
    for key, needed in _IPCONFIG_NEEDS.items():
        if key in seen and needed not in seen:
            raise ValueError(f"{key} needs {needed}")
    return value


def _is_address(text: str, *, version: int, network: bool) -> bool:
    """An address (or, `network`, an address with its prefix length: 192.0.2.10/24) of that IP version."""
    try:
        if network:
            _, slash, prefix = text.partition("/")
            return bool(slash) and prefix.isdigit() and ipaddress.ip_interface(text).version == version
        return ipaddress.ip_address(text).version == version
    except ValueError:
        return False


def _nameserver(value: str) -> str:
    # PVE's `address-list`; the addresses separated by spaces.
    if not value or not all(
        _is_address(a, version=4, network=False) or _is_address(a, version=6, network=False) for a in value.split(" ")
    ):
        raise ValueError("must be IP addresses separated by single spaces")
    return value


def _pattern(rule: re.Pattern[str], what: str) -> AfterValidator:
    def check(value: str) -> str:
        if not rule.fullmatch(value):
            raise ValueError(f"must be {what}")
        return value

    return AfterValidator(check)


SshKey = Annotated[str, AfterValidator(_ssh_key)]
Tag = Annotated[str, _pattern(TAG, "a PVE tag: lowercase letters, digits and _ + . - (not first: + . -)")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class CloudInitIn(_Strict):
    user: Annotated[str, _pattern(USER, "a login name: lowercase letters, digits, _ . - (at most 32)")] | None = None
    ssh_keys: list[SshKey] = []
    ipconfig0: Annotated[str, AfterValidator(_ipconfig)] | None = None
    nameserver: Annotated[str, AfterValidator(_nameserver)] | None = None


class NetworkIn(_Strict):
    bridge: Annotated[str, _pattern(BRIDGE, "a bridge name: letters, digits, _ . - (at most 15)")] | None = None
    vlan: Annotated[int, Field(ge=1, le=4094)] | None = None


class BoxOptionsIn(_Strict):
    """The options of a box entry of the admin file (db/load.py's BoxIn adds id, name and template)."""

    start: bool = False
    # Within PostgreSQL's INTEGER; a run that waits that long for an address still ends when it comes.
    wait_for_ip_seconds: Annotated[int, Field(ge=0, le=2**31 - 1)] = 0
    cloud_init: CloudInitIn | None = None
    pool: Annotated[str, _pattern(POOL, "a PVE pool name: letters, digits, _ . -, up to 3 levels a/b/c")] | None = None
    tags: list[Tag] = []
    network: NetworkIn | None = None

    def columns(self) -> dict[str, Any]:
        """The Box row's option columns (db/models.py Box)."""
        return {
            "start": self.start,
            "wait_for_ip_seconds": self.wait_for_ip_seconds,
            "cloud_init": self.cloud_init.model_dump() if self.cloud_init is not None else None,
            "pool": self.pool,
            "tags": list(dict.fromkeys(self.tags)),  # PVE keeps a tag once
            "network": self.network.model_dump() if self.network is not None else None,
        }


# ------------------------------------------------------------------------- what the database hands on


@dataclass(frozen=True)
class CloudInitSettings:
    user: str | None = None
    ssh_keys: list[str] = field(default_factory=list)
    ipconfig0: str | None = None
    nameserver: str | None = None


@dataclass(frozen=True)
class NetworkSettings:
    bridge: str | None = None
    vlan: int | None = None


@dataclass(frozen=True)
class BoxSettings:
    """A box's options as stored; the defaults are a box that names none (and every box made before them)."""

    start: bool = False
    wait_for_ip_seconds: int = 0
    cloud_init: CloudInitSettings | None = None
    pool: str | None = None
    tags: list[str] = field(default_factory=list)
    network: NetworkSettings | None = None

    @classmethod
    def of(cls, box: Box | Row[Any]) -> BoxSettings:
        """From a box, or a row of a box's columns."""
        return cls(
            start=box.start,
            wait_for_ip_seconds=box.wait_for_ip_seconds,
            cloud_init=CloudInitSettings(**box.cloud_init) if box.cloud_init is not None else None,
            pool=box.pool,
            tags=list(box.tags),
            network=NetworkSettings(**box.network) if box.network is not None else None,
        )
