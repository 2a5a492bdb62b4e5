"""boxctl's read-only listings: plans, users, templates, boxes, VMs and reservations, as aligned tables."""

import argparse
from collections.abc import Sequence
from typing import Any

from sqlmodel import col, select

from cli import open_engine
from db.box_options import BoxSettings
from db.engine import session
from db.models import Box, Plan, Reservation, SessionToken, Template, TemplateUser, User, Vm, utcnow
from db.tokens import is_valid


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns, two spaces apart, under a header line."""
    cells = [list(headers), *([cell(v) for v in row] for row in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def cmd_plans(_args: argparse.Namespace) -> None:
    with session(open_engine()) as db:
        plans = db.exec(select(Plan).order_by(col(Plan.id))).all()
    headers = ["ID", "NAME", "VM CORES", "VM MEM MB", "VM DISK GB", "CORES", "MEM MB", "DISK GB", "VMS"]
    rows = [
        [
            p.id,
            p.name,
            p.per_vm_cores,
            p.per_vm_memory_mb,
            p.per_vm_disk_gb,
            p.total_cores,
            p.total_memory_mb,
            p.total_disk_gb,
            p.total_vms,
        ]
        for p in plans
    ]
    print(table(headers, rows))


def cmd_users(_args: argparse.Namespace) -> None:
    with session(open_engine()) as db:
        users = db.exec(select(User).order_by(col(User.username))).all()
        plan_ids = set(db.exec(select(Plan.id)).all())
        # The tokens that let their user in now: revoked and expired ones are history (`token list` shows them).
        now = utcnow()
        tokens: dict[str, int] = {}
        for token in db.exec(select(SessionToken)).all():
            if is_valid(token, now):
                tokens[token.username] = tokens.get(token.username, 0) + 1
    rows = [
        # A plan that is not defined is shown as such: that user's requests get "plan not found".
        [
            u.username,
            (u.plan_id if u.plan_id in plan_ids else f"{u.plan_id} (undefined)") if u.plan_id else None,
            tokens.get(u.username, 0),
        ]
        for u in users
    ]
    print(table(["USERNAME", "PLAN", "VALID TOKENS"], rows))


def cmd_templates(_args: argparse.Namespace) -> None:
    with session(open_engine()) as db:
        templates = db.exec(select(Template).order_by(col(Template.id))).all()
        allowed: dict[str, list[str]] = {}
        for link in db.exec(select(TemplateUser).order_by(col(TemplateUser.username))).all():
            allowed.setdefault(link.template_id, []).append(link.username)
    rows = [[t.id, t.name, t.node, t.vmid, t.public, ",".join(allowed.get(t.id, [])) or None] for t in templates]
    print(table(["ID", "NAME", "NODE", "VMID", "PUBLIC", "ALLOWED USERS"], rows))


def cmd_boxes(_args: argparse.Namespace) -> None:
    with session(open_engine()) as db:
        boxes = db.exec(select(Box).order_by(col(Box.id))).all()
        template_ids = set(db.exec(select(Template.id)).all())
    rows = [
        # A box may name a template that is not defined; using it answers 404, so say so here.
        [
            b.id,
            b.name,
            b.template_id if b.template_id in template_ids else f"{b.template_id} (undefined)",
            *box_options(BoxSettings.of(b)),
        ]
        for b in boxes
    ]
    print(table(["ID", "NAME", "TEMPLATE", "START", "CLOUD-INIT", "POOL", "TAGS", "NETWORK"], rows))


def box_options(box: BoxSettings) -> list[str | None]:
    """The options compactly: `yes, ip 300s`, `ubuntu, 2 keys, ip=dhcp, dns 192.0.2.53`, `vmbr1 vlan 42`."""
    start = ("yes" + (f", ip {box.wait_for_ip_seconds}s" if box.wait_for_ip_seconds else "")) if box.start else "no"
    ci = box.cloud_init
    cloud_init = None
    if ci is not None:
        keys = f"{len(ci.ssh_keys)} key" + ("" if len(ci.ssh_keys) == 1 else "s")
        dns = f"dns {ci.nameserver}" if ci.nameserver else None
        cloud_init = ", ".join(part for part in (ci.user, keys, ci.ipconfig0, dns) if part)
    net = box.network
    network = " ".join(p for p in (net.bridge, f"vlan {net.vlan}" if net.vlan else None) if p) if net else None
    return [start, cloud_init, box.pool, ",".join(box.tags) or None, network or None]


def cmd_vms(args: argparse.Namespace) -> None:
    query = select(Vm).order_by(col(Vm.created_at), col(Vm.task_id))
    if args.user:
        query = query.where(Vm.username == args.user)
    with session(open_engine()) as db:
        vms = db.exec(query).all()
    headers = ["TASK ID", "USER", "VMID", "NODE", "NAME", "CORES", "MEM MB", "DISK GB", "CREATED", "DELETED"]
    rows = [
        [
            v.task_id,
            v.username,
            v.vmid,
            v.node,
            v.name,
            v.cores,
            v.memory_mb,
            v.disk_gb,
            when(v.created_at),
            when(v.deleted_at),
        ]
        for v in vms
    ]
    print(table(headers, rows))


def cmd_reservations(args: argparse.Namespace) -> None:
    query = select(Reservation).order_by(col(Reservation.created_at), col(Reservation.task_id))
    if args.user:
        query = query.where(Reservation.username == args.user)
    with session(open_engine()) as db:
        reservations = db.exec(query).all()
    headers = ["TASK ID", "USER", "STATE", "VMID", "CORES", "MEM MB", "DISK GB", "CREATED", "UPDATED"]
    rows = [
        [
            r.task_id,
            r.username,
            r.state,
            r.vmid,
            r.cores,
            r.memory_mb,
            r.disk_gb,
            when(r.created_at),
            when(r.updated_at),
        ]
        for r in reservations
    ]
    print(table(headers, rows))


def when(value: Any) -> str | None:
    # SQLite hands datetimes back without their timezone; they are stored in UTC either way.
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else None
