"""The API's Temporal client: connected at startup, or at the first request if the server was down then."""

from __future__ import annotations

import asyncio

from temporalio.client import Client

from settings import Settings


class TemporalConnection:
    def __init__(self, settings: Settings):
        self._settings = settings
        self._client: Client | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> Client:
        if self._client is None:
            async with self._lock:
                if self._client is None:
                    self._client = await asyncio.wait_for(
                        Client.connect(self._settings.temporal_address, namespace=self._settings.temporal_namespace),
                        timeout=5,
                    )
        return self._client
