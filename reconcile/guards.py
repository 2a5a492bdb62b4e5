"""What the repair tool makes sure of before it looks at anything: the database exists and is at the
current schema (it never creates either), and the Temporal namespace exists. Each failed check is a reason
to refuse (`Refused`, exit status 2), all of them said at once."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, make_url
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from db.schema import SchemaError, require_current
from reconcile.observe import ReconcileError

# PostgreSQL's SQLSTATE for a database that does not exist (invalid_catalog_name).
NO_SUCH_DATABASE = "3D000"


class Refused(ReconcileError):
    """The repair tool will not act, nor even look: one reason per line. Nothing was done."""

    def __init__(self, reasons: list[str]):
        super().__init__("\n".join(reasons))
        self.reasons = reasons


def _shown(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def missing_database(url: str) -> str | None:
    """Why the SQLite database of `url` is missing (None if it is there, or is not SQLite). Checked before
    any engine is made: connecting would create the file (and make_engine its directory), an empty database
    that looks to the repair tool as if the service had never made a VM."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return None
    path = parsed.database or ""
    if path in ("", ":memory:"):
        return f"database {_shown(url)} is in memory: it holds none of the service's records"
    if not Path(path).is_file():
        return f"database {_shown(url)} does not exist (no file {path}): is DATABASE_URL right?"
    return None


def schema_refusal(engine: Engine) -> str | None:
    """Why the database cannot be used as it is (None if it is at the current schema); never changes it."""
    try:
        require_current(engine)
    except SchemaError as exc:
        return str(exc)
    except OperationalError as exc:
        if getattr(exc.orig, "sqlstate", None) == NO_SUCH_DATABASE:
            return f"database {_shown(str(engine.url))} does not exist: is DATABASE_URL right?"
        raise ReconcileError(f"database: {exc}") from exc
    except SQLAlchemyError as exc:
        raise ReconcileError(f"database: {exc}") from exc
    return None


async def namespace_refusal(temporal: Client) -> str | None:
    """Why Temporal's namespace cannot be used (None if it exists). In a namespace that does not exist every
    run is "not found"; the repair tool never takes that alone as evidence, but refuses outright rather than
    report every leftover as unknown."""
    try:
        await temporal.workflow_service.describe_namespace(DescribeNamespaceRequest(namespace=temporal.namespace))
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            return (
                f"Temporal namespace '{temporal.namespace}' does not exist at "
                f"{temporal.service_client.config.target_host}: is TEMPORAL_NAMESPACE right?"
            )
        raise ReconcileError(f"cannot reach Temporal at {temporal.service_client.config.target_host}: {exc}") from exc
    return None
