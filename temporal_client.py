"""The one way every process (the API, the worker, `boxctl reconcile`) connects to Temporal: address and
namespace, and the TLS and API key of the settings.

Temporal is a trust boundary: whoever can start a workflow on the service's task queue can create VMs as any
user, so a production frontend takes only clients that prove who they are (mTLS, or an API key).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest, ListSearchAttributesRequest
from temporalio.client import Client
from temporalio.common import SearchAttributeKey
from temporalio.runtime import Runtime
from temporalio.service import RPCError, RPCStatusCode, TLSConfig

from settings import Settings, SettingsError

log = logging.getLogger("temporal")


def _read(variable: str, path: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise SettingsError(f"{variable}: cannot read {path}: {exc.strerror or exc}") from None


def temporal_tls(settings: Settings) -> TLSConfig | None:
    """The TLS of the settings' files (read now: a missing file is a SettingsError naming it), or None when no
    file is set (plain TCP, or TLS with the system's roots when an API key is set)."""
    if bool(settings.temporal_tls_cert) != bool(settings.temporal_tls_key):
        raise SettingsError("TEMPORAL_TLS_CERT and TEMPORAL_TLS_KEY go together: set both (mTLS) or neither")
    cert = _read("TEMPORAL_TLS_CERT", settings.temporal_tls_cert)
    key = _read("TEMPORAL_TLS_KEY", settings.temporal_tls_key)
    ca = _read("TEMPORAL_TLS_CA", settings.temporal_tls_ca)
    if cert is None and ca is None:
        return None
    return TLSConfig(client_cert=cert, client_private_key=key, server_root_ca_cert=ca)


async def connect_temporal(settings: Settings, runtime: Runtime | None = None) -> Client:
    """A client of the settings' Temporal namespace. Raises SettingsError for unusable TLS settings, and what
    `Client.connect` raises when the server cannot be reached. `runtime`: the worker's, whose telemetry exports
    the SDK's metrics (and the service's, through its meter); None: the SDK's default runtime."""
    api_key = settings.temporal_api_key.get_secret_value() or None
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        # None: the SDK's own rule, TLS exactly when an API key is given (an API key never goes out in clear).
        tls=temporal_tls(settings),
        api_key=api_key,
        runtime=runtime,
    )


async def ensure_search_attributes(
    client: Client, namespace: str, keys: Sequence[SearchAttributeKey] | None = None
) -> None:
    """Register the custom search attributes (`keys`, by default the workflows') the server does not know yet.
    The API and the worker each call it as they start: whichever comes first, runs are started with (and upsert)
    attributes the server knows."""
    if keys is None:
        # Imported here: the workflows package imports this module (start_deletion_now connects to Temporal).
        from workflows.search_attributes import SEARCH_ATTRIBUTES

        keys = SEARCH_ATTRIBUTES
    existing = await client.operator_service.list_search_attributes(ListSearchAttributesRequest(namespace=namespace))
    missing = {
        key.name: IndexedValueType.ValueType(key.indexed_value_type)
        for key in keys
        if key.name not in existing.custom_attributes
    }
    if missing:
        try:
            await client.operator_service.add_search_attributes(
                AddSearchAttributesRequest(namespace=namespace, search_attributes=missing)
            )
        except RPCError as exc:
            # Another process starting at the same moment registered them first.
            if exc.status != RPCStatusCode.ALREADY_EXISTS and "already exists" not in str(exc):
                raise
        log.info("registered search attributes %s", sorted(missing))
