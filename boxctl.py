"""boxctl: the admin CLI. Loads admin data, issues session tokens, and lists what the database holds."""

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import Engine
from sqlmodel import col, select

from db.engine import make_engine, session
from db.load import LoadError, load_admin_data
from db.models import Box, Plan, Reservation, SessionToken, Template, TemplateUser, User, Vm
from db.schema import SchemaError, head, require_current, state, upgrade
from db.tokens import new_token, token_hash
from settings import get_settings


class CliError(Exception):
    """A refusal to report as `boxctl: <message>` with exit status 1."""


def _engine() -> Engine:
    """The database, refused unless it is at the schema this version needs (`boxctl db upgrade` brings it there)."""
    engine = make_engine(get_settings().database_url)
    try:
        require_current(engine)
    except SchemaError as exc:
        engine.dispose()
        raise CliError(str(exc)) from None
    return engine


def cmd_db_upgrade(_args: argparse.Namespace) -> None:
    engine = make_engine(get_settings().database_url)
    try:
        before = upgrade(engine)
        current, meaning = state(engine)
    except SchemaError as exc:
        raise CliError(str(exc)) from None
    finally:
        engine.dispose()
    print(meaning if before == current else f"{meaning}, upgraded from {before or 'no revision'}")


def cmd_db_current(_args: argparse.Namespace) -> int:
    engine = make_engine(get_settings().database_url)
    try:
        current, meaning = state(engine)
    finally:
        engine.dispose()
    print(meaning)
    return 0 if current == head() else 1


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned columns, two spaces apart, under a header line."""
    cells = [list(headers), *([_cell(v) for v in row] for row in rows)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def cmd_load(args: argparse.Namespace) -> None:
    try:
        with open(args.file, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as exc:
        raise CliError(f"cannot read {args.file}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CliError(f"{args.file} is not valid JSON: {exc}") from None
    try:
        report = load_admin_data(_engine(), data)
    except LoadError as exc:
        raise CliError(f"{exc.message}\n{args.file} refused: nothing was written") from None
    print("\n".join(report.lines()))


def cmd_token_issue(args: argparse.Namespace) -> None:
    engine = _engine()
    token = new_token()
    with session(engine) as db, db.begin():
        if db.get(User, args.username) is None:
            raise CliError(f"user '{args.username}' is not defined")
        db.add(SessionToken(token_hash=token_hash(token), username=args.username))
    # Printed once, here: the database keeps only its hash.
    print(token)


def cmd_plans(_args: argparse.Namespace) -> None:
    with session(_engine()) as db:
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
    print(_table(headers, rows))


def cmd_users(_args: argparse.Namespace) -> None:
    with session(_engine()) as db:
        users = db.exec(select(User).order_by(col(User.username))).all()
        plan_ids = set(db.exec(select(Plan.id)).all())
        tokens: dict[str, int] = {}
        for name in db.exec(select(SessionToken.username)).all():
            tokens[name] = tokens.get(name, 0) + 1
    rows = [
        # A plan that is not defined is shown as such: that user's requests get "plan not found".
        [
            u.username,
            (u.plan_id if u.plan_id in plan_ids else f"{u.plan_id} (undefined)") if u.plan_id else None,
            tokens.get(u.username, 0),
        ]
        for u in users
    ]
    print(_table(["USERNAME", "PLAN", "TOKENS"], rows))


def cmd_templates(_args: argparse.Namespace) -> None:
    with session(_engine()) as db:
        templates = db.exec(select(Template).order_by(col(Template.id))).all()
        allowed: dict[str, list[str]] = {}
        for link in db.exec(select(TemplateUser).order_by(col(TemplateUser.username))).all():
            allowed.setdefault(link.template_id, []).append(link.username)
    rows = [[t.id, t.name, t.node, t.vmid, t.public, ",".join(allowed.get(t.id, [])) or None] for t in templates]
    print(_table(["ID", "NAME", "NODE", "VMID", "PUBLIC", "ALLOWED USERS"], rows))


def cmd_boxes(_args: argparse.Namespace) -> None:
    with session(_engine()) as db:
        boxes = db.exec(select(Box).order_by(col(Box.id))).all()
        template_ids = set(db.exec(select(Template.id)).all())
    rows = [
        # A box may name a template that is not defined; using it answers 404, so say so here.
        [b.id, b.name, b.template_id if b.template_id in template_ids else f"{b.template_id} (undefined)"]
        for b in boxes
    ]
    print(_table(["ID", "NAME", "TEMPLATE"], rows))


def cmd_vms(args: argparse.Namespace) -> None:
    query = select(Vm).order_by(col(Vm.created_at), col(Vm.task_id))
    if args.user:
        query = query.where(Vm.username == args.user)
    with session(_engine()) as db:
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
            _time(v.created_at),
            _time(v.deleted_at),
        ]
        for v in vms
    ]
    print(_table(headers, rows))


def cmd_reservations(args: argparse.Namespace) -> None:
    query = select(Reservation).order_by(col(Reservation.created_at), col(Reservation.task_id))
    if args.user:
        query = query.where(Reservation.username == args.user)
    with session(_engine()) as db:
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
            _time(r.created_at),
            _time(r.updated_at),
        ]
        for r in reservations
    ]
    print(_table(headers, rows))


def cmd_reconcile(args: argparse.Namespace) -> int:
    """Report (and with --fix repair) drift between PVE, the database and Temporal; 1 while any remains or
    something could not be checked."""
    import asyncio

    from reconcile import ReconcileError, reconcile

    try:
        report = asyncio.run(reconcile(get_settings(), fix=args.fix))
    except ReconcileError as exc:
        raise CliError(str(exc)) from None
    print("\n".join(report.lines()))
    return report.exit_code


def _time(value: Any) -> str | None:
    # SQLite hands datetimes back without their timezone; they are stored in UTC either way.
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="boxctl", description="Admin CLI of the VM provisioning service.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, handler: Callable[[argparse.Namespace], int | None], text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text)
        sub.set_defaults(handler=handler)
        return sub

    database = commands.add_parser("db", help="the database's schema")
    database_commands = database.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    for name, handler, text in (
        (
            "upgrade",
            cmd_db_upgrade,
            "bring the database to the schema of this version, its data kept (also an empty one, or one made "
            "before schema migrations); the other commands, the API and the worker need it",
        ),
        ("current", cmd_db_current, "print the database's schema revision; exit status 1 unless it is current"),
    ):
        database_commands.add_parser(name, help=text, description=text).set_defaults(handler=handler)

    add("load", cmd_load, "upsert plans, users, templates and boxes from a JSON file").add_argument("file")

    token = commands.add_parser("token", help="manage session tokens")
    token_commands = token.add_subparsers(dest="token_command", required=True, metavar="COMMAND")
    issue = token_commands.add_parser("issue", help="issue a new session token for a user and print it")
    issue.add_argument("username")
    issue.set_defaults(handler=cmd_token_issue)

    add("plans", cmd_plans, "list compute resource plans")
    add("users", cmd_users, "list users")
    add("templates", cmd_templates, "list templates")
    add("boxes", cmd_boxes, "list boxes")
    add("vms", cmd_vms, "list VMs the service created").add_argument("--user", help="only this user's VMs")
    add("reservations", cmd_reservations, "list quota reservations").add_argument(
        "--user", help="only this user's reservations"
    )
    add(
        "reconcile",
        cmd_reconcile,
        "compare PVE with the database and Temporal: VMs carrying the marker of a task that owns nothing and "
        "is not running (orphans), reservations and clone slots of tasks not running, VMs gone from PVE or "
        "back on it; exit status 1 while any remain or something could not be checked",
    ).add_argument(
        "--fix",
        action="store_true",
        help="repair what is found: destroy orphan VMs, release the reservations, free the clone slots (handing "
        "them to the next waiting runs), mark VMs gone from PVE deleted and count VMs back on PVE again; "
        "a VM without the marker is never touched",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        status = args.handler(args)
    except CliError as exc:
        # One prefixed line per problem: a refused load may list several.
        for line in str(exc).splitlines():
            print(f"boxctl: {line}", file=sys.stderr)
        return 1
    return status or 0  # a handler may answer its own exit status (reconcile: 1 while drift remains)


if __name__ == "__main__":
    sys.exit(main())
