"""What the repair tool makes sure of before it looks at anything: the database exists and is at the
current schema (it never creates either), and the Temporal namespace exists. Each failed check is a reason
to refuse (`Refused`, exit status 2), all of them said at once."""

from __future__ import annotations

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from db.engine import missing_database as missing_database  # re-exported: the repair tool's first check
from db.engine import shown_url
from db.schema import SchemaError, require_current
from reconcile.observe import ReconcileError

# PostgreSQL's SQLSTATE for a database that does not exist (invalid_catalog_name).
NO_SUCH_DATABASE = "3D000"


class Refused(ReconcileError):
    """The repair tool will not act, nor even look: one reason per line. Nothing was done."""

    def __init__(self, reasons: list[str]):
        super().__init__("\n".join(reasons))
        self.reasons = reasons


def schema_refusal(engine: Engine) -> str | None:
    """Why the database cannot be used as it is (None if it is at the current schema); never changes it."""
    try:
        require_current(engine)
    except SchemaError as exc:
        return str(exc)
    except OperationalError as exc:
        if getattr(exc.orig, "sqlstate", None) == NO_SUCH_DATABASE:
            return f"database {shown_url(str(engine.url))} does not exist: is DATABASE_URL right?"
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
