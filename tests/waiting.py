"""Waiting in tests for something that happens elsewhere (a fake PVE thread, a worker, a server)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any


async def until(condition: Callable[[], bool], timeout: float = 30) -> None:
    for _ in range(int(timeout / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


async def until_async(probe: Callable[[], Awaitable[Any]], expected: Any, timeout: float = 30) -> None:
    seen = None
    for _ in range(int(timeout / 0.1)):
        seen = await probe()
        if seen == expected:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"expected {expected}, last saw {seen}")
