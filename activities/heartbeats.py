"""Heartbeats for activities blocked in a PVE call, sent from one helper thread per worker."""

from __future__ import annotations

import contextvars
import itertools
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

from temporalio import activity

# While an activity's thread is blocked in a PVE call, a helper thread heartbeats this often, so that a worker
# that dies is noticed within the workflow's short heartbeat timeout rather than after the call's timeout.
HEARTBEAT_EVERY = 2.0
HEARTBEAT_SENDERS = 8  # heartbeats waiting for the worker's loop at once
log = logging.getLogger(__name__)


class Heartbeats:
    """Heartbeats the activities that are blocked in a PVE call, every `every` seconds, from one helper thread
    per PveActivities (one per worker).

    That thread is started with the activities, never from an activity's own thread: cancelling a threaded
    activity raises an exception in its thread (PyThreadState_SetAsyncExc), and on CPython 3.11 a thread
    being started carries its parent's id until it runs, so it can be killed before it has started, and
    Thread.start() then waits forever. A threaded activity's heartbeat waits until the worker's event loop
    takes it; the heartbeats go out side by side (a pool the helper starts), so a busy loop delays each by
    one turn of the loop, not by one turn per activity in flight."""

    def __init__(self, every: float = HEARTBEAT_EVERY):
        self._every = every
        self._beating: dict[int, contextvars.Context] = {}  # dict operations are atomic: no lock to leak
        self._next_key = itertools.count()
        threading.Thread(target=self._run, name="heartbeats", daemon=True).start()

    @contextmanager
    def during(self) -> Iterator[None]:
        key = next(self._next_key)
        self._beating[key] = contextvars.copy_context()
        try:
            yield
        finally:
            self._beating.pop(key, None)

    def _run(self) -> None:
        pool = ThreadPoolExecutor(max_workers=HEARTBEAT_SENDERS, thread_name_prefix="heartbeat")
        sending: dict[int, Future[None]] = {}
        next_round = time.monotonic()
        while True:
            next_round += self._every
            time.sleep(max(0.0, next_round - time.monotonic()))
            try:
                for key, context in list(self._beating.items()):
                    if key not in sending or sending[key].done():  # one at a time per activity
                        sending[key] = pool.submit(self._send, context)
                for key in [k for k, sent in sending.items() if sent.done() and k not in self._beating]:
                    del sending[key]
            except BaseException:  # this thread is every activity's heartbeat: it must not end
                log.exception("heartbeat round failed")

    @staticmethod
    def _send(context: contextvars.Context) -> None:
        try:
            context.run(activity.heartbeat)
        except Exception as exc:  # the worker's loop was slow to take it, or the activity just ended
            log.debug("heartbeat not sent: %r", exc)
