"""boxctl: the admin CLI. Upgrades the database, loads admin data, manages tokens and VMs, lists what the database
holds (cli/listings.py) and runs the repair tool."""

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

from sqlalchemy.exc import OperationalError

from cli import CliError, open_engine
from cli.listings import cmd_boxes, cmd_plans, cmd_reservations, cmd_templates, cmd_users, cmd_vms, table, when
from db.engine import make_engine, missing_database
from db.load import LoadError, load_admin_data
from db.schema import SchemaError, head, state, upgrade
from db.tokens import TokenError, issue, revoke, revoke_all, tokens_of
from db.vms import NotDeletable, UnknownVm, forget, live_vm
from logs import configure_logging
from settings import SettingsError, get_settings


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
    url = get_settings().database_url
    missing = missing_database(url)
    if missing is not None:
        print(f"{missing} (`boxctl db upgrade` creates it)")
        return 1
    engine = make_engine(url)
    try:
        current, meaning = state(engine)
    finally:
        engine.dispose()
    print(meaning)
    return 0 if current == head() else 1


def cmd_load(args: argparse.Namespace) -> None:
    try:
        with open(args.file, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as exc:
        raise CliError(f"cannot read {args.file}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CliError(f"{args.file} is not valid JSON: {exc}") from None
    try:
        report = load_admin_data(open_engine(), data)
    except LoadError as exc:
        raise CliError(f"{exc.message}\n{args.file} refused: nothing was written") from None
    print("\n".join(report.lines()))


def cmd_token_issue(args: argparse.Namespace) -> None:
    expires_in = timedelta(days=args.expires_in) if args.expires_in is not None else None
    token, row = issue(open_engine(), args.username, expires_in)
    # Printed once, here: the database keeps only its hash. The id is what `token revoke` takes.
    print(f"token: {token}\nid: {row.id}")


def cmd_token_list(args: argparse.Namespace) -> None:
    rows = [
        [t.id, when(t.created_at), when(t.expires_at), when(t.revoked_at)]
        for t in tokens_of(open_engine(), args.username)
    ]
    # Never the token, nor its hash: a listing may end up in a ticket or a terminal log.
    print(table(["ID", "CREATED", "EXPIRES", "REVOKED"], rows))


def cmd_token_revoke(args: argparse.Namespace) -> None:
    row, now = revoke(open_engine(), args.token_id)
    print(f"{row.id} ({row.username}) {'revoked' if now else 'was already revoked'} at {when(row.revoked_at)}")


def cmd_user_disable(args: argparse.Namespace) -> None:
    count = revoke_all(open_engine(), args.username)
    print(f"{args.username}: {count} token{'' if count == 1 else 's'} revoked; no token of theirs is valid now")


def _days(value: str) -> int:
    days = int(value) if value.isdigit() and len(value) <= 6 else 0
    if not 0 < days <= 36500:  # a hundred years is "never"; more would overflow the date
        raise argparse.ArgumentTypeError(f"expected a whole number of days from 1 to 36500, got '{value}'")
    return days


def cmd_vm_delete(args: argparse.Namespace) -> None:
    from workflows.delete_vm import start_deletion_now

    engine = open_engine()
    try:
        print(start_deletion_now(get_settings(), engine, live_vm(engine, _vmid(args.vmid))))  # its task id
    except (ConnectionError, SettingsError, NotDeletable) as exc:  # NotDeletable: deleted meanwhile
        raise CliError(f"cannot start the deletion: {exc}") from None


def cmd_vm_forget(args: argparse.Namespace) -> None:
    engine = open_engine()
    vmid = _vmid(args.vmid)
    deleting = live_vm(engine, vmid).deleting_task_id
    if deleting and not args.force:
        # The deletion marks the VM deleted itself if it destroys it; forgotten meanwhile, a deletion that then
        # fails would leave a VM on PVE that no plan counts. An operator who knows better says --force.
        from workflows.delete_vm import deletion_running

        try:
            running = deletion_running(get_settings(), deleting)
        except (ConnectionError, SettingsError) as exc:
            raise CliError(
                f"VM {vmid} has a deletion ({deleting}) that cannot be looked at: {exc}; --force forgets it anyway"
            ) from None
        # A deletion started from here on is not seen: an operator's race, and forgetting stays what it says.
        if running:
            raise CliError(
                f"VM {vmid} is being deleted by task {deleting}: wait for it to end, or --force to forget it anyway"
            )
    vm = forget(engine, vmid)
    print(f"VM {vm.vmid} ({vm.name}, {vm.username}, task {vm.task_id}) marked deleted; PVE was not touched")


def _vmid(value: str) -> int:
    if not value.isdecimal() or int(value) <= 0:
        raise CliError(f"expected a VMID, got '{value}'")
    return int(value)


def cmd_reconcile(args: argparse.Namespace) -> int:
    """Report (and with --fix repair) drift between PVE, the database and Temporal; 1 while any remains or
    something could not be checked, 2 when it refuses to act. With --history, list its past actions."""
    import asyncio

    from reconcile import DEFAULT_MAX_DESTROY, ReconcileError, Refused, history, reconcile

    settings = get_settings()
    try:
        if args.history is not None:
            rows = [
                [when(a.at), a.kind, a.action, a.task_id, a.vmid, a.node, a.username, a.detail]
                for a in history(settings, args.history)
            ]
            print(table(["AT", "KIND", "ACTION", "TASK", "VMID", "NODE", "USER", "DETAIL"], rows))
            return 0
        settings.require_pve_user()  # before anything is read: without PVE there is nothing to compare
        max_destroy = DEFAULT_MAX_DESTROY if args.max_destroy is None else args.max_destroy
        report = asyncio.run(reconcile(settings, fix=args.fix, max_destroy=max_destroy))
    except Refused as exc:
        for reason in exc.reasons:
            print(f"boxctl: refused, nothing done: {reason}", file=sys.stderr)
        return 2
    except (ReconcileError, SettingsError) as exc:
        raise CliError(str(exc)) from None
    print("\n".join(report.lines()))
    return report.exit_code


def _count(value: str) -> int:
    if not value.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number of 0 or more, got '{value}'")
    return int(value)


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
    tokens = token.add_subparsers(dest="token_command", required=True, metavar="COMMAND")
    user = commands.add_parser("user", help="manage users")
    users = user.add_subparsers(dest="user_command", required=True, metavar="COMMAND")

    def add_to(group: Any, name: str, handler: Callable[[argparse.Namespace], None], text: str, arg: str) -> Any:
        sub = group.add_parser(name, help=text, description=text)
        sub.add_argument(arg)
        sub.set_defaults(handler=handler)
        return sub

    add_to(
        tokens, "issue", cmd_token_issue, "issue a session token for a user; print it and its id", "username"
    ).add_argument("--expires-in", type=_days, metavar="DAYS", help="expire after DAYS days (default: never)")
    add_to(tokens, "list", cmd_token_list, "list a user's tokens: id, creation, expiry, revocation", "username")
    add_to(tokens, "revoke", cmd_token_revoke, "revoke a token: it authenticates nobody from now on", "token_id")
    add_to(users, "disable", cmd_user_disable, "revoke all of a user's tokens", "username")

    add("plans", cmd_plans, "list compute resource plans")
    add("users", cmd_users, "list users")
    add("templates", cmd_templates, "list templates")
    add("boxes", cmd_boxes, "list boxes")
    add("vms", cmd_vms, "list VMs the service created").add_argument("--user", help="only this user's VMs")
    add("reservations", cmd_reservations, "list quota reservations").add_argument(
        "--user", help="only this user's reservations"
    )
    vm = commands.add_parser("vm", help="act on one VM the service created, whoever owns it")
    vms = vm.add_subparsers(dest="vm_command", required=True, metavar="COMMAND")
    add_to(vms, "delete", cmd_vm_delete, "delete a VM as its owner's DELETE would; print the task id", "vmid")
    forget_vm = add_to(
        vms, "forget", cmd_vm_forget, "mark a VM record deleted without touching PVE (gone or reused)", "vmid"
    )
    forget_vm.add_argument(
        "--force", action="store_true", help="also while a deletion of it runs (or Temporal cannot be asked)"
    )
    repair = add(
        "reconcile",
        cmd_reconcile,
        "compare PVE with the database and Temporal: VMs carrying the marker of a task that has no VM record "
        "and whose run is known to be over without success (orphans), reservations and clone slots of runs "
        "known to be over, VMIDs of VM records gone from PVE, VMs seen deleted back on PVE. A run is known to "
        "be over when Temporal says it failed, was cancelled, terminated or timed out, or does not know it and "
        "its reservation is released; anything else (a completed run's VM without a record, a run Temporal "
        "does not know, a VMID holding a VM without its task's marker) is a warning, left alone. Exit status "
        "1 while findings or warnings remain; 2 when it refuses (a missing database, one not at the current "
        "schema, a Temporal namespace that does not exist, a database without any VM record while PVE shows "
        "marked VMs, more destroys than --max-destroy): then nothing is done",
    )
    repair.add_argument(
        "--fix",
        action="store_true",
        help="repair what is found: destroy orphan VMs, release the reservations, free the clone slots (handing "
        "them to the next waiting runs), mark records whose VMID is gone from PVE deleted and count VMs back on "
        "PVE again; each action is printed and written to the audit table. A VM without the marker of the "
        "task is never touched",
    )
    repair.add_argument(
        "--max-destroy",
        type=_count,
        metavar="N",
        help="refuse to act at all if it would destroy more than N VMs (default 5); raise it knowingly",
    )
    repair.add_argument(
        "--history",
        type=_count,
        nargs="?",
        const=20,
        metavar="N",
        help="print the last N actions of --fix from the audit table (default 20) and do nothing else",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if get_settings().log_format == "json":
            # What the commands log (the repair tool's warnings) as every process does; what they print for
            # the person at the terminal stays text, on stdout.
            configure_logging("json", logging.WARNING)
        status = args.handler(args)
    except (CliError, TokenError, UnknownVm) as exc:  # an unknown user, token id or VMID
        # One prefixed line per problem: a refused load may list several.
        for line in str(exc).splitlines():
            print(f"boxctl: {line}", file=sys.stderr)
        return 1
    except OperationalError as exc:  # the database is not there, refuses us, or is busy: say so, no traceback
        print(f"boxctl: database error (DATABASE_URL): {_first_line(exc.orig or exc)}", file=sys.stderr)
        return 1
    return status or 0  # a handler may answer its own exit status (reconcile: 1 while drift remains)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


if __name__ == "__main__":
    sys.exit(main())
