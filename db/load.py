"""`boxctl load`: upsert plans, users, templates and boxes from an admin JSON file.

The whole file is validated (shape, values, references) before anything is written, and everything is
written in one transaction: a refused file leaves the database as it was. Nothing is ever deleted, so
running the same file twice changes nothing the second time.
"""

from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError
from pydantic_core import ErrorDetails
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from db.engine import session
from db.models import Box, Plan, SessionToken, Template, TemplateUser, User
from db.tokens import MIN_TOKEN_LENGTH, token_hash


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


# Strict mode (on every model below) refuses bools and numeric strings where an int is expected.
PositiveInt = Annotated[int, Field(gt=0)]
Name = Annotated[str, StringConstraints(min_length=1), AfterValidator(_no_surrounding_space)]
Token = Annotated[str, StringConstraints(min_length=MIN_TOKEN_LENGTH), AfterValidator(_token_chars)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


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
    tokens: list[Token] = []


class TemplateIn(_Strict):
    id: Name
    name: Name
    node: Name
    vmid: PositiveInt
    public: bool = False
    allowed_users: list[Name] = []


class BoxIn(_Strict):
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
    """What one load did, per kind. A user counts as updated when it gains a token, a template when it
    gains an allowed user."""

    plans: Counts = field(default_factory=Counts)
    users: Counts = field(default_factory=Counts)
    templates: Counts = field(default_factory=Counts)
    boxes: Counts = field(default_factory=Counts)
    tokens_added: int = 0
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
            f"tokens: {self.tokens_added} added",
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
    loc = list(error["loc"])
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
    # One token belongs to one user; a token listed twice for the same user is harmless.
    owners: dict[str, str] = {}
    for index, user in enumerate(parsed.users):
        for t_index, token in enumerate(user.tokens):
            owner = owners.setdefault(token, user.username)
            if owner != user.username:
                label = _entry_label(data, "users", index)
                problems.append(f"{label}: tokens[{t_index}] is also a token of user '{owner}'")
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
        for t_index, token in enumerate(user.tokens):
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
            for token in dict.fromkeys(u.tokens):  # a token listed twice is added once
                digest = token_hash(token)
                if db.get(SessionToken, digest) is None:
                    db.add(SessionToken(token_hash=digest, username=u.username))
                    report.tokens_added += 1
                    outcome = "updated" if outcome == "unchanged" else outcome
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
            values = {"id": b.id, "name": b.name, "template_id": b.template}
            report.boxes.add(_upsert(db, Box, "id", values))
    return report
