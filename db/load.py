"""`boxctl load`: upsert plans, users, templates and boxes from an admin JSON file.

The whole file is validated (shape, values, references) before anything is written, and everything is
written in one transaction: a refused file leaves the database as it was. Nothing is ever deleted, so
running the same file twice changes nothing the second time.
"""

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    ValidationError,
)
from pydantic_core import ErrorDetails
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from db.box_options import BoxOptionsIn
from db.engine import session
from db.models import Box, Plan, SessionToken, Template, TemplateUser, User
from db.tokens import MIN_TOKEN_LENGTH, as_utc, token_hash


class LoadError(Exception):
    """The file is refused; nothing was written."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def _no_surrounding_space(value: str) -> str:
    # " alice" and "alice" would be two different users that look the same in every listing.
    if value != value.strip():
        raise ValueError("must not start or end with whitespace")
    return value


def _token_chars(value: str) -> str:
    # A token has to travel in an `Authorization: Bearer ...` header, where whitespace and control
    # characters cannot be carried intact; such a token could never authenticate.
    if not value.isascii() or not value.isprintable() or any(c.isspace() for c in value):
        raise ValueError("must be printable ASCII without whitespace")
    return value


def _date_time_string(value: Any) -> Any:
    # Without this, a number would pass as Unix time: nobody writes an expiry that way in this file.
    if not isinstance(value, str):
        raise ValueError("must be a date-time string such as 2027-01-01T00:00:00Z")
    return value


def _in_utc(value: datetime) -> datetime:
    # SQLite keeps a datetime's wall-clock time and drops its offset: every one is stored in UTC.
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError("is out of range") from None


# Strict mode (on every model below) refuses bools and numeric strings where an int is expected.
PositiveInt = Annotated[int, Field(gt=0)]
Name = Annotated[str, StringConstraints(min_length=1), AfterValidator(_no_surrounding_space)]
Token = Annotated[str, StringConstraints(min_length=MIN_TOKEN_LENGTH), AfterValidator(_token_chars)]
# An RFC 3339 instant with its offset; strict mode would take only datetime objects, never JSON's strings.
Expiry = Annotated[AwareDatetime, BeforeValidator(_date_time_string), Field(strict=False), AfterValidator(_in_utc)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TokenIn(_Strict):
    token: Token
    expires_at: Expiry | None = None  # absent or null: never expires


# A token is a string, or an object with its expiry. Tagged by the JSON type, so that pydantic reports the
# errors of the form given only, not of both; `_describe` leaves the tags out of the location it prints.
_TOKEN_STRING, _TOKEN_OBJECT = _TOKEN_FORMS = ("token string", "token object")
TokenEntry = Annotated[
    Annotated[Token, Tag(_TOKEN_STRING)] | Annotated[TokenIn, Tag(_TOKEN_OBJECT)],
    Discriminator(lambda value: _TOKEN_OBJECT if isinstance(value, dict) else _TOKEN_STRING),
]


class PerVmIn(_Strict):
    cores: PositiveInt
    memory_mb: PositiveInt
    disk_gb: PositiveInt


class TotalIn(_Strict):
    cores: PositiveInt
    memory_mb: PositiveInt
    disk_gb: PositiveInt
    vms: PositiveInt | None = None  # absent or null: no limit on the count of VMs


class PlanIn(_Strict):
    id: Name
    name: Name
    per_vm: PerVmIn
    total: TotalIn


class UserIn(_Strict):
    username: Name
    plan: Name | None = None  # absent or null: the user has no plan
    tokens: list[TokenEntry] = []

    def token_entries(self) -> list[tuple[str, datetime | None]]:
        """(token, expiry) of each entry, in the order of the file; None: it never expires."""
        return [(t, None) if isinstance(t, str) else (t.token, t.expires_at) for t in self.tokens]


class TemplateIn(_Strict):
    id: Name
    name: Name
    node: Name
    vmid: PositiveInt
    public: bool = False
    allowed_users: list[Name] = []


class BoxIn(BoxOptionsIn):  # start, cloud_init, pool, tags, network, ... (db/box_options.py)
    id: Name
    name: Name
    template: Name  # may name a template that is not defined: the box is kept


class AdminFile(_Strict):
    plans: list[PlanIn] = []
    users: list[UserIn] = []
    templates: list[TemplateIn] = []
    boxes: list[BoxIn] = []


# The key that names an entry of each section, used in messages and to find duplicates.
_ENTRY_KEY = {"plans": "id", "users": "username", "templates": "id", "boxes": "id"}


@dataclass
class Counts:
    created: int = 0
    updated: int = 0
    unchanged: int = 0

    def add(self, outcome: str) -> None:
        setattr(self, outcome, getattr(self, outcome) + 1)

    def __str__(self) -> str:
        return f"{self.created} created, {self.updated} updated, {self.unchanged} unchanged"


@dataclass
class LoadReport:
    """What one load did, per kind. A user counts as updated when it gains a token or a token's expiry
    changes, a template when it gains an allowed user. A revoked token listed in the file stays revoked."""

    plans: Counts = field(default_factory=Counts)
    users: Counts = field(default_factory=Counts)
    templates: Counts = field(default_factory=Counts)
    boxes: Counts = field(default_factory=Counts)
    tokens_added: int = 0
    tokens_updated: int = 0
    tokens_kept_revoked: int = 0
    allowed_users_added: int = 0

    @property
    def changed(self) -> bool:
        return any(c.created or c.updated for c in (self.plans, self.users, self.templates, self.boxes))

    def lines(self) -> list[str]:
        return [
            f"plans: {self.plans}",
            f"users: {self.users}",
            f"templates: {self.templates}",
            f"boxes: {self.boxes}",
            f"tokens: {self.tokens_added} added, {self.tokens_updated} updated, "
            f"{self.tokens_kept_revoked} revoked (not revived)",
            f"allowed users: {self.allowed_users_added} added",
        ]


def _entry_label(data: Any, section: str, index: int) -> str:
    """`users[1] (bob)`: the position, plus the entry's own name when it has a usable one."""
    label = f"{section}[{index}]"
    try:
        name = data[section][index][_ENTRY_KEY[section]]
    except (KeyError, IndexError, TypeError):
        return label
    return f"{label} ({name})" if isinstance(name, str) and name else label


def _describe(data: Any, error: ErrorDetails) -> str:
    """One pydantic error as `users[1] (bob): tokens[0]: ...`. Never echoes the input: it may be a token."""
    loc = [part for part in error["loc"] if part not in _TOKEN_FORMS]
    prefix: list[str] = []
    if len(loc) >= 2 and loc[0] in _ENTRY_KEY and isinstance(loc[1], int):
        prefix.append(_entry_label(data, str(loc[0]), loc[1]))
        loc = loc[2:]
    # Render the rest of the location as a path: per_vm.cores, tokens[0].
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    if error["type"] == "extra_forbidden":
        message = f"unknown key '{path}'"
    elif error["type"] == "missing":
        message = f"missing key '{path}'"
    else:
        message = f"{path}: {error['msg']}" if path else error["msg"]
    return ": ".join([*prefix, message])


def validate_file(data: Any) -> AdminFile:
    """Shape and values only; references to the database are checked by load_admin_data."""
    if not isinstance(data, dict):
        raise LoadError('the file must hold a JSON object with "plans", "users", "templates" and "boxes"')
    try:
        parsed = AdminFile.model_validate(data)
    except ValidationError as exc:
        raise LoadError("\n".join(_describe(data, e) for e in exc.errors())) from None
    problems: list[str] = []
    for section, key in _ENTRY_KEY.items():
        seen: dict[str, int] = {}
        for index, entry in enumerate(getattr(parsed, section)):
            name = getattr(entry, key)
            if name in seen:
                problems.append(
                    f"{_entry_label(data, section, index)}: {key} '{name}' "
                    f"is already defined by {section}[{seen[name]}]"
                )
            seen.setdefault(name, index)
    # One token belongs to one user; a token listed twice for the same user is harmless, unless the two
    # entries disagree on when it expires.
    owners: dict[str, str] = {}
    for index, user in enumerate(parsed.users):
        label = _entry_label(data, "users", index)
        first: dict[str, tuple[int, datetime | None]] = {}
        for t_index, (token, expires_at) in enumerate(user.token_entries()):
            owner = owners.setdefault(token, user.username)
            if owner != user.username:
                problems.append(f"{label}: tokens[{t_index}] is also a token of user '{owner}'")
            f_index, f_expires_at = first.setdefault(token, (t_index, expires_at))
            if f_expires_at != expires_at:
                problems.append(f"{label}: tokens[{t_index}] is tokens[{f_index}] again, with another expires_at")
    if problems:
        raise LoadError("\n".join(problems))
    return parsed


def _check_references(db: Session, data: Any, parsed: AdminFile) -> None:
    """Refuse what the file refers to but neither it nor the database defines, and tokens of other users."""
    problems: list[str] = []
    file_plans = {p.id for p in parsed.plans}
    file_users = {u.username for u in parsed.users}
    for index, user in enumerate(parsed.users):
        if user.plan is not None and user.plan not in file_plans and db.get(Plan, user.plan) is None:
            problems.append(
                f"{_entry_label(data, 'users', index)}: plan '{user.plan}' "
                "is defined neither in the file nor in the database"
            )
        for t_index, (token, _) in enumerate(user.token_entries()):
            stored = db.get(SessionToken, token_hash(token))
            if stored is not None and stored.username != user.username:
                # Moving a token silently would log its current owner out and hand the session over.
                problems.append(
                    f"{_entry_label(data, 'users', index)}: tokens[{t_index}] "
                    f"is already a token of user '{stored.username}'"
                )
    for index, template in enumerate(parsed.templates):
        for name in template.allowed_users:
            if name not in file_users and db.get(User, name) is None:
                problems.append(
                    f"{_entry_label(data, 'templates', index)}: allowed user '{name}' "
                    "is defined neither in the file nor in the database"
                )
    if problems:
        raise LoadError("\n".join(problems))


def _upsert(db: Session, model: type[Any], key: str, values: dict[str, Any]) -> str:
    """Create the row or bring its columns to `values`; returns "created", "updated" or "unchanged"."""
    row = db.get(model, values[key])
    if row is None:
        db.add(model(**values))
        return "created"
    changed = {k: v for k, v in values.items() if getattr(row, k) != v}
    for k, v in changed.items():
        setattr(row, k, v)
    return "updated" if changed else "unchanged"


def _upsert_tokens(db: Session, user: UserIn, report: LoadReport) -> bool:
    """Add the user's new tokens and bring the expiry of the others to the file's (a string: never expires);
    whether anything changed. A revoked token is left as it is: a file that still lists a leaked token must
    not bring it back."""
    changed = False
    for token, expires_at in dict(user.token_entries()).items():  # a token listed twice is added once
        digest = token_hash(token)
        stored = db.get(SessionToken, digest)
        if stored is None:
            db.add(SessionToken(token_hash=digest, username=user.username, expires_at=expires_at))
            report.tokens_added += 1
            changed = True
        elif stored.revoked_at is not None:
            report.tokens_kept_revoked += 1
        elif (as_utc(stored.expires_at) if stored.expires_at else None) != expires_at:
            stored.expires_at = expires_at
            report.tokens_updated += 1
            changed = True
    return changed


def load_admin_data(engine: Engine, data: Any) -> LoadReport:
    """Validate `data` (the parsed JSON file) entirely, then upsert it in one transaction.

    Raises LoadError, with one line per problem, each naming the entry; nothing is written then.
    """
    parsed = validate_file(data)
    report = LoadReport()
    # One transaction: the reference checks read the same state the writes apply to (on SQLite,
    # BEGIN IMMEDIATE holds the write lock from the start), and a LoadError rolls everything back.
    with session(engine) as db, db.begin():
        _check_references(db, data, parsed)

        for p in parsed.plans:
            values = {
                "id": p.id,
                "name": p.name,
                "per_vm_cores": p.per_vm.cores,
                "per_vm_memory_mb": p.per_vm.memory_mb,
                "per_vm_disk_gb": p.per_vm.disk_gb,
                "total_cores": p.total.cores,
                "total_memory_mb": p.total.memory_mb,
                "total_disk_gb": p.total.disk_gb,
                "total_vms": p.total.vms,
            }
            report.plans.add(_upsert(db, Plan, "id", values))

        for u in parsed.users:
            outcome = _upsert(db, User, "username", {"username": u.username, "plan_id": u.plan})
            # Tokens reference the user row: it must be in the database before they are.
            db.flush()
            if _upsert_tokens(db, u, report) and outcome == "unchanged":
                outcome = "updated"
            report.users.add(outcome)
        # Allowed users below reference these user rows.
        db.flush()

        for t in parsed.templates:
            values = {"id": t.id, "name": t.name, "node": t.node, "vmid": t.vmid, "public": t.public}
            outcome = _upsert(db, Template, "id", values)
            db.flush()  # allowed users reference the template row
            allowed = set(db.exec(select(TemplateUser.username).where(col(TemplateUser.template_id) == t.id)).all())
            for name in dict.fromkeys(t.allowed_users):
                if name not in allowed:
                    db.add(TemplateUser(template_id=t.id, username=name))
                    report.allowed_users_added += 1
                    outcome = "updated" if outcome == "unchanged" else outcome
            report.templates.add(outcome)

        for b in parsed.boxes:
            values = {"id": b.id, "name": b.name, "template_id": b.template, **b.columns()}
            report.boxes.add(_upsert(db, Box, "id", values))
    return report
