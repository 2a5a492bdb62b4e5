"""How the workflows call their activities: retry policies, timeouts and budgets, each with its reason,
and the call shapes used more than once."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar, overload

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, is_cancelled_exception
from temporalio.exceptions import CancelledError as ActivityCancelled
from temporalio.exceptions import TimeoutError as ActivityTimedOut

with workflow.unsafe.imports_passed_through():
    from activities.db import DbActivities
    from activities.pve import PveActivities
    from payloads import FINAL_FAILURES, MSG_UNAVAILABLE, Failure

T = TypeVar("T")
A = TypeVar("A")

# PVE calls: dropped connections, lock timeouts and 5xx are retried with backoff for a while (PVE_BUDGET),
# then the step fails. A budget of time, not of attempts: a step of several requests on a network that
# drops one in four fails most attempts, yet succeeds within a minute. At most 10 s between attempts: a
# PVE lock or a node that comes back is used soon after.
PVE_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=10),
    non_retryable_error_types=FINAL_FAILURES,
)
PVE_BUDGET = timedelta(minutes=5)
# Activities that change PVE heartbeat every 2 s even while blocked in a PVE call: a worker killed in the
# middle of one is noticed this soon, and the step goes on elsewhere.
PVE_HEARTBEAT = timedelta(seconds=10)
# Waiting for a long PVE task: each attempt is one look, a retry the next. Nothing is held between looks,
# and they grow apart with the task's age, to one every 20 s.
POLL_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=1.5,
    maximum_interval=timedelta(seconds=20),
    non_retryable_error_types=FINAL_FAILURES,
)
# Cleanup must happen in the end, however long PVE (or the database) is in trouble.
CLEANUP_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=1),
)
# A database step takes milliseconds; a few quick retries ride over a lock held for a moment.
DB_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=200),
    maximum_attempts=10,
    non_retryable_error_types=FINAL_FAILURES,
)
# A creation's record comes after its VM is made: it rides over a database away for about 5 minutes (PVE_BUDGET,
# as when the configuration's activity records it) before the run gives up and undoes a finished VM.
RECORD_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=200),
    maximum_interval=timedelta(seconds=10),
    maximum_attempts=35,  # 12.6 s of growing pauses, then 29 of 10 s
    non_retryable_error_types=FINAL_FAILURES,
)
DB_TIMEOUT = timedelta(seconds=30)
CLONE_TIMEOUT = timedelta(hours=2)
VMID_CHANGES = 3  # how often a VMID taken outside the service is replaced before the clone fails
CLONE_STARTS = 3  # a clone that failed on a lock another task held is started again, this often
SLOT_RECHECK = timedelta(minutes=5)  # a waiting run looks at the queue this often even if nobody tells it
# An admission's local activity: how long each attempt may take (a creation's; a lab's checks every target and
# holds up to 100 reservations). Its attempts write nothing past this (activities.db.Deadlines).
ADMIT_ATTEMPT = timedelta(seconds=30)
LAB_ADMIT_ATTEMPT = timedelta(seconds=60)
# How far apart the worker's clock (which ends an attempt) and the server's (workflow.now()) may be.
CLOCK_SLACK = timedelta(seconds=2)


# Database steps take milliseconds: local activities (no round trip through the server), with these options.
@overload
def db_step(
    activity: Callable[[DbActivities, A], Awaitable[T]],
    arg: A,
    retry_policy: RetryPolicy = DB_RETRY,
    summary: str | None = None,
) -> Awaitable[T]: ...
@overload
def db_step(
    activity: Callable[[DbActivities, A], T], arg: A, retry_policy: RetryPolicy = DB_RETRY, summary: str | None = None
) -> Awaitable[T]: ...
def db_step(
    activity: Callable[[DbActivities, A], Any], arg: A, retry_policy: RetryPolicy = DB_RETRY, summary: str | None = None
) -> Awaitable[Any]:
    """`summary`: the step's one line in the Web UI's event history."""
    return workflow.execute_local_activity_method(
        activity, arg, start_to_close_timeout=DB_TIMEOUT, retry_policy=retry_policy, summary=summary
    )


def watch_clone(activity: Callable[[PveActivities, A], None], arg: A, summary: str) -> Awaitable[None]:
    """Wait for the clone to end: each attempt is one look at PVE, the retry policy spaces them."""
    return workflow.execute_activity_method(
        activity,
        arg,
        start_to_close_timeout=timedelta(seconds=30),
        schedule_to_close_timeout=CLONE_TIMEOUT,
        retry_policy=POLL_RETRY,
        summary=summary,
    )


def pve_change(
    activity: Callable[[Any, A], T], arg: A, start_to_close_timeout: timedelta, summary: str | None = None
) -> Awaitable[T]:
    """A step that changes PVE (of any workflow): it heartbeats while PVE works, so a killed worker is noticed in
    seconds, and transient errors are retried for PVE_BUDGET. `summary`: its line in the Web UI."""
    return workflow.execute_activity_method(
        activity,
        arg,
        start_to_close_timeout=start_to_close_timeout,
        heartbeat_timeout=PVE_HEARTBEAT,
        schedule_to_close_timeout=PVE_BUDGET,
        retry_policy=PVE_RETRY,
        summary=summary,
    )


def innermost_reason(err: BaseException) -> str:
    """The innermost message of an activity's failure, for operators (kept in the run's failure details)."""
    while isinstance(err, ActivityError) and err.cause is not None:
        err = err.cause
    return str(err)


async def admission_outcome(admitted: Callable[[], T | None], refused: Callable[[], ApplicationError | None]) -> T:
    """An admission update's answer (a creation's or a lab's): the admission once there is one, or the refusal
    raised."""
    await workflow.wait_condition(lambda: admitted() is not None or refused() is not None)
    refusal = refused()
    if refusal is not None:
        raise refusal
    admission = admitted()
    assert admission is not None
    return admission


def admission_refusal(err: BaseException) -> ApplicationError:
    """The seed's words for an admission that did not go through (a creation's or a lab's)."""
    cause = err.cause if isinstance(err, ActivityError) else err
    if isinstance(cause, ApplicationError) and cause.type in {f.value for f in Failure}:
        return ApplicationError(cause.message, type=cause.type, non_retryable=True)
    if is_cancelled_exception(err):
        # Cancelled before anything was made: the REST API gave the request up (and answered 503).
        return ApplicationError(MSG_UNAVAILABLE, "cancelled during admission", type=Failure.UNAVAILABLE.value)
    # PVE or the database did not answer in time, or its retries ran out.
    return ApplicationError(MSG_UNAVAILABLE, innermost_reason(err), type=Failure.UNAVAILABLE.value)


def admission_budget(admit_by: datetime | None, default: timedelta) -> timedelta:
    """What is left of the caller's admission deadline (a REST request waits for it), else `default`. A run
    that a worker picks up only after that deadline creates nothing: refused with the 503's message."""
    if admit_by is None:
        return default
    left = admit_by - workflow.now()
    if left <= timedelta(0):
        raise ApplicationError(MSG_UNAVAILABLE, type=Failure.UNAVAILABLE.value, non_retryable=True)
    return min(left, default)


async def admission_settled(err: BaseException, admit_by: datetime | None, attempt: timedelta) -> None:
    """After an admission that failed with `err`: if its local activity was given up while its last attempt ran
    (timed out, or cancelled with the run: the SDK does not wait for a thread), wait until that attempt can no
    longer write (its deadlines, activities.db.Deadlines), so that what the run then gives back includes
    whatever it wrote. Began before now, the attempt ends by now + `attempt` at the latest, or by `admit_by`."""
    if not (isinstance(err, ActivityError) and isinstance(err.cause, (ActivityTimedOut, ActivityCancelled))):
        return  # the activity's own answer ended it: nothing of it runs on
    settled = workflow.now() + attempt if admit_by is None else min(admit_by, workflow.now() + attempt)
    wait = settled + CLOCK_SLACK - workflow.now()
    if wait > timedelta(0):
        await workflow.sleep(wait, summary="until the admission's last attempt can no longer write")


def is_reset() -> bool:
    """True in a run an operator reset: it has a run id of its own, but keeps the first run's
    first_execution_run_id (seen on the dev server; no continue-as-new or workflow retry makes another run here)."""
    info = workflow.info()
    return info.run_id != info.first_execution_run_id


async def to_the_end(step: Awaitable[T], on_cancel: Callable[[], None]) -> T:
    """Await `step` to its end even if the run is cancelled meanwhile (a step that changed the world must finish,
    or its undo would miss it); `on_cancel` hears of each cancellation that arrived meanwhile."""
    task = asyncio.ensure_future(step)
    while True:
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done():
                return task.result()
            on_cancel()


def refused_by_its_checks(err: BaseException) -> bool:
    """Admission's own checks refused the request (the box, PVE, the plan): they come before it asks for a clone
    slot, so the run holds none."""
    cause = err.cause if isinstance(err, ActivityError) else err  # a local activity's failure comes as it is
    return isinstance(cause, ApplicationError) and cause.type in {f.value for f in Failure}


def error_type(err: ActivityError) -> str | None:
    """The type of the ApplicationError an activity failed with, if it failed with one."""
    return err.cause.type if isinstance(err.cause, ApplicationError) else None
