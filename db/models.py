"""Table models. API request/response models live in api/schemas.py, Temporal payloads in payloads.py."""

import secrets
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, Column, Index, false, text
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


class Plan(SQLModel, table=True):
    """A compute resource plan: limits for one VM, and for all of a user's VMs together."""

    id: str = Field(primary_key=True)
    name: str
    per_vm_cores: int
    per_vm_memory_mb: int
    per_vm_disk_gb: int
    total_cores: int
    total_memory_mb: int
    total_disk_gb: int
    total_vms: int | None = None  # None: no limit on the count of VMs


class User(SQLModel, table=True):
    __tablename__ = "app_user"

    username: str = Field(primary_key=True)
    # Not a foreign key on purpose: a plan deleted later leaves the user with "Compute resource plan not found".
    plan_id: str | None = None


class SessionToken(SQLModel, table=True):
    """A session Bearer token; only its SHA-256 is kept. `id` names it to operators (list, revoke, audit lines)
    without revealing it. A token is valid until it expires or is revoked; a revoked token stays revoked."""

    token_hash: str = Field(primary_key=True)
    id: str = Field(default_factory=lambda: f"tok_{secrets.token_hex(8)}", unique=True, index=True)
    username: str = Field(foreign_key="app_user.username", index=True)
    created_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime | None = None  # None: never expires
    revoked_at: datetime | None = None


class Template(SQLModel, table=True):
    id: str = Field(primary_key=True)
    name: str
    node: str
    vmid: int
    public: bool = False


class TemplateUser(SQLModel, table=True):
    """A user allowed to use a template that is not public."""

    template_id: str = Field(foreign_key="template.id", primary_key=True)
    username: str = Field(foreign_key="app_user.username", primary_key=True)


class Box(SQLModel, table=True):
    id: str = Field(primary_key=True)
    name: str
    # Not a foreign key: a box may name a template that is not (or no longer) defined.
    template_id: str
    # What makes its VMs ready to use (db/box_options.py). The server defaults are a box without options: the
    # boxes of a database made before them. The nested ones are JSON, as db/box_options.py's models dump them.
    start: bool = Field(default=False, sa_column_kwargs={"server_default": false()})
    wait_for_ip_seconds: int = Field(default=0, sa_column_kwargs={"server_default": text("0")})
    cloud_init: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    pool: str | None = None
    tags: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False, server_default=text("'[]'")))
    network: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))


class ReservationState(StrEnum):
    """Where a creation's quota stands; stored as its value in `reservation.state` (a plain string column)."""

    HELD = "held"  # the creation is under way
    COMMITTED = "committed"  # the VM was made: it counts through its Vm row now
    RELEASED = "released"  # the creation failed or was cancelled: given back


class Reservation(SQLModel, table=True):
    """Quota held for one creation, keyed by its task id: held while it runs, then committed or released."""

    __table_args__ = (
        # Two live creations never get the same VMID.
        Index(
            "uq_reservation_held_vmid",
            "vmid",
            unique=True,
            sqlite_where=text("state = 'held'"),
            postgresql_where=text("state = 'held'"),
        ),
    )

    task_id: str = Field(primary_key=True)
    username: str = Field(index=True)
    cores: int
    memory_mb: int
    disk_gb: int
    vmid: int | None = None  # None only while a lab VM's retry holds the quota its first try handed over
    state: str = Field(default=ReservationState.HELD.value, index=True)  # a ReservationState
    # A lab VM's first try: the task id its VM is tried again under. The try's undo hands its quota over to it
    # (quota.undo_creation), so that no other creation of the owner's takes it before the retry is admitted.
    retry_task_id: str | None = None
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class Vm(SQLModel, table=True):
    """A VM the service created. Counts against its owner's plan until it is seen deleted."""

    task_id: str = Field(primary_key=True)
    username: str = Field(index=True)
    vmid: int = Field(index=True)
    node: str
    name: str
    cores: int
    memory_mb: int
    disk_gb: int
    created_at: datetime = Field(default_factory=utcnow)
    deleted_at: datetime | None = None
    # What GET vms shows. Null in records made before the service kept them.
    box_id: str | None = None
    storage: str | None = None
    # The deletion under way (DeleteVmWorkflow's task id); set when one starts, cleared when it fails. Kept
    # once the VM is deleted: it names the deletion that did it, which a repeat of that run takes as done.
    deleting_task_id: str | None = None
    # The guest's addresses (IPv4 first) once known; an empty list until then.
    ip_addresses: list[str] = Field(
        default_factory=list, sa_column=Column(JSON, nullable=False, server_default=text("'[]'"))
    )


class CloneSlot(SQLModel, table=True):
    """A full clone under way, counted against the per-node and per-storage clone limits."""

    task_id: str = Field(primary_key=True)
    node: str = Field(index=True)
    storage: str = Field(index=True)
    acquired_at: datetime = Field(default_factory=utcnow)
    # Whose creation: turns are fair between owners (db.clone_slots). '' for rows made before owners were kept.
    owner: str = Field(default="", sa_column_kwargs={"server_default": ""})


class CloneWaiter(SQLModel, table=True):
    """A creation waiting for a clone slot; a freed slot goes to the owner with the fewest clones running there."""

    task_id: str = Field(primary_key=True)
    node: str
    storage: str
    queued_at: datetime = Field(default_factory=utcnow, index=True)
    owner: str = Field(default="", sa_column_kwargs={"server_default": ""})


class CloneGrant(SQLModel, table=True):
    """A clone slot handed to a waiting creation when another freed it, kept until the receiver has taken it.
    The freeing run may carry out its release twice (a worker dies before the run records the answer); the
    second time must name the same receivers, or one sleeps on a slot it holds without knowing it."""

    task_id: str = Field(primary_key=True)  # the creation given the slot
    granted_by: str = Field(index=True)  # the creation that freed it
    granted_at: datetime = Field(default_factory=utcnow)


# Short names, as the rest of the code and the tests use them.
HELD, COMMITTED, RELEASED = ReservationState.HELD, ReservationState.COMMITTED, ReservationState.RELEASED


class RepairAction(SQLModel, table=True):
    """What `boxctl reconcile --fix` did, one row per action, kept for operators to audit."""

    __tablename__ = "repair_action"

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(default_factory=utcnow, index=True)
    kind: str  # the finding repaired: orphan VM, stale reservation, ...
    action: str  # what was done: destroyed, released, marked deleted, ...
    task_id: str = Field(index=True)
    vmid: int | None = None
    node: str = ""
    username: str = ""
    detail: str = ""


class RateLimitWindow(SQLModel, table=True):
    """Authenticated requests of one token in one minute (RATE_LIMIT_PER_MINUTE), shared by every API process."""

    __tablename__ = "rate_limit_window"

    token_hash: str = Field(primary_key=True)
    minute: int = Field(primary_key=True)  # Unix time // 60
    count: int = 0
