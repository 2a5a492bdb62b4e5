"""The VMID a new creation gets: one PVE showed free that the service has not given out already, chosen under
a lock that every user's creations share (the quota's own lock is per user)."""

from sqlalchemy import bindparam, select, text, union

from db.engine import table_of
from db.models import HELD, Reservation, Vm

_reservations, _vms = table_of(Reservation), table_of(Vm)


class NoFreeVmid(Exception):
    """Every candidate VMID is held by another live creation; transient (look at PVE again)."""


# Any constant: the advisory lock that serialises VMID choice across users on PostgreSQL (the user row lock
# alone would let two users' creations pick the same lowest free VMID).
VMID_LOCK_KEY = 0x0B0C5108


def lock_vmids(db) -> None:  # type: ignore[no-untyped-def]
    if db.get_bind().dialect.name == "postgresql":
        db.exec(text(f"SELECT pg_advisory_xact_lock({VMID_LOCK_KEY})"))


# Given-out VMIDs read at first while looking for a free one, doubled at each further read.
VMID_BATCH = 64


def pick_vmid(db, free_ranges: list[list[int]]) -> int:  # type: ignore[no-untyped-def]
    """The lowest VMID that PVE showed free and that the service has not given out: neither held by a live
    creation (not on PVE yet) nor one of its VMs (PVE's answer may be a moment old). Reads only the given-out
    VMIDs from the candidate up (few: PVE's free ranges hold none of the VMs it has), not every VM's."""
    for first, last in free_ranges:
        vmid, batch = first, VMID_BATCH
        while vmid <= last:
            given_out = _given_out(db, vmid, last, batch)
            for given in given_out:
                if given > vmid:
                    return vmid
                vmid = given + 1
            if len(given_out) < batch and vmid <= last:
                return vmid
            batch *= 2  # as many creations in flight as this: read them in a few statements, not one per 64
    raise NoFreeVmid("every VMID PVE showed free is held by another creation")


def _given_out(db, first: int, last: int, limit: int) -> list[int]:  # type: ignore[no-untyped-def]
    """The first `limit` VMIDs from `first` to `last` held by a live creation or one of the service's VMs, in
    order. One statement, so one snapshot: a commit moving a creation from held to a VM record lands in one of
    its two halves (and the VMID lock keeps other creations from taking any meanwhile)."""
    bounds = {"first": first, "last": last, "limit": limit}
    return list(db.execute(_GIVEN_OUT, bounds).scalars().all())


def _given_out_statement():  # type: ignore[no-untyped-def]
    given_out = union(
        select(_reservations.c.vmid).where(
            _reservations.c.state == HELD.value, _reservations.c.vmid.between(bindparam("first"), bindparam("last"))
        ),
        select(_vms.c.vmid).where(
            _vms.c.deleted_at.is_(None), _vms.c.vmid.between(bindparam("first"), bindparam("last"))
        ),
    ).subquery()
    return select(given_out.c.vmid).order_by(given_out.c.vmid).limit(bindparam("limit"))


_GIVEN_OUT = _given_out_statement()
