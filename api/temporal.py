"""The API's Temporal client: connected at startup, or at the first request if the server was down then."""

from __future__ import annotations

import asyncio

from temporalio.client import Client

from settings import Settings
from temporal_client import connect_temporal, temporal_tls


class TemporalConnection:
    def __init__(self, settings: Settings):
        # TLS files that cannot be read are a SettingsError here, in the app's startup: the API refuses to
        # start instead of answering 503 to every request.
        temporal_tls(settings)
        self._settings = settings
        self._client: Client | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> Client:
        if self._client is None:
            async with self._lock:
                if self._client is None:
                    self._client = await asyncio.wait_for(connect_temporal(self._settings), timeout=5)
        return self._client
