"""Admission of a creation: start its CreateFromBoxWorkflow run with update-with-start and wait for the run's
`admission` update, which answers once the request is admitted (the VMID is fixed) or refused with the seed's
words. A request not admitted in time answers 503 and is given up, so that it never creates anything, also
later.

The refusals that need no PVE (box, template record, permission) are answered from the database before any run
starts: a refused request then costs three reads by primary key (about 1 ms), not a run kept for the
namespace's retention."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine
from temporalio.client import (
    Client,
    WithStartWorkflowOperation,
    WorkflowFailureError,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.common import TypedSearchAttributes, WorkflowIDConflictPolicy
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from api.errors import ApiError
from api.idempotency import RunChanged, request_memo
from api.task_state import STATE_MEMO, find_task
from db.boxes import template_for
from db.quota import Refused
from payloads import (
    MSG_CLONE_FAILED,
    MSG_UNAVAILABLE,
    Admission,
    CreateFromBoxInput,
    CreateFromBoxResult,
    LabAdmission,
    LabInput,
    Step,
    TaskKind,
    TaskState,
    status_of,
)
from workflows import CreateFromBoxWorkflow, LabWorkflow, search_attributes
from workflows.metadata import creation_details, creation_summary, lab_details, lab_summary

log = logging.getLogger("api")

# The run's own admission deadline comes this much before the POST's (ADMISSION_TIMEOUT_SECONDS), a quarter of
# it at most: the answer of a run admitted at its deadline still reaches the caller, and the POST answers within
# the time the setting names.
ADMISSION_GRACE_SECONDS = 2.0
# Waiting for the admission update ends with one of these when the answer does not come in time, or when the
# server cannot be asked.
NOT_IN_TIME = (TimeoutError, WorkflowUpdateRPCTimeoutOrCancelledError, RPCError)


def initial_state(input: CreateFromBoxInput) -> TaskState:
    """The state a creation's run publishes first (step admission), written at its start."""
    return TaskState(owner=input.username, vm_name=input.name, node=input.target)


def new_task_id(box_id: str, prefix: str = "clone") -> str:
    """clone-<box>-<ms>-<random> (lab-... for a lab): readable in the Web UI, unique without coordination."""
    box = re.sub(r"[^A-Za-z0-9_.-]", "_", box_id)[:64]
    return f"{prefix}-{box}-{int(time.time() * 1000)}-{secrets.token_hex(3)}"


class Admitter:
    def __init__(self, client: Client, engine: Engine, task_queue: str, timeout: float):
        self.client = client
        self.engine = engine
        self.task_queue = task_queue
        self.timeout = timeout

    async def admit(self, task_id: str, input: CreateFromBoxInput) -> Admission:
        """Start the run `task_id` and wait for its admission; 503 (and nothing created, ever) if that takes
        longer than the admission timeout. WorkflowAlreadyStartedError if a run of that id is open. A request
        refused by the box, template or permission check answers without a run."""
        return await self._admit(
            task_id,
            input,
            CreateFromBoxWorkflow.run,
            CreateFromBoxWorkflow.admission,
            initial_state(input),
            # With BoxStep too: the run then publishes only what changes (CreateFromBoxWorkflow._publish).
            search_attributes.at_start(
                input.username, box_id=input.box_id, node=input.target, step=Step.ADMISSION.value
            ),
            creation_summary(input),
            creation_details(input),
        )

    async def admit_lab(self, task_id: str, input: LabInput) -> LabAdmission:
        """As `admit`, for a lab: its LabWorkflow answers once every VM of it is admitted."""
        return await self._admit(
            task_id,
            input,
            LabWorkflow.run,
            LabWorkflow.admission,
            TaskState(owner=input.username, vm_name=input.name, kind=TaskKind.LAB.value),
            search_attributes.at_start(input.username, box_id=input.box_id),
            lab_summary(input),
            lab_details(input),
        )

    async def _admit(
        self,
        task_id: str,
        input: CreateFromBoxInput | LabInput,
        run: Any,
        update: Any,
        state: TaskState,
        attributes: TypedSearchAttributes,
        summary: str,
        details: str,
    ) -> Any:
        await self.precheck(input.username, input.box_id)
        input.admit_by = self.deadline()
        start = WithStartWorkflowOperation(
            run,
            input,
            id=task_id,
            task_queue=self.task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.FAIL,
            # The owner and the task's state from the start, not from when a worker first runs it: a run that no
            # worker has picked up yet is listed by GET tasks, shown by GET tasks/{task_id} and can be cancelled.
            memo={**request_memo(input), STATE_MEMO: dataclasses.asdict(state)},
            search_attributes=attributes,
            # What the Web UI lists the run by, instead of its id alone.
            static_summary=summary,
            static_details=details,
        )
        return await self._start_and_wait(task_id, update, start)

    def deadline(self) -> datetime:
        """The run's admission deadline (admit_by): past it, the run creates nothing."""
        grace = min(ADMISSION_GRACE_SECONDS, self.timeout / 4)
        return datetime.now(UTC) + timedelta(seconds=self.timeout - grace)

    async def _start_and_wait(self, task_id: str, update: Any, start: WithStartWorkflowOperation[Any, Any]) -> Any:
        try:
            return await asyncio.wait_for(
                self.client.execute_update_with_start_workflow(update, start_workflow_operation=start),
                self.timeout,
            )
        except WorkflowUpdateFailedError as exc:
            raise refusal(exc) from exc
        except WorkflowAlreadyStartedError:
            await take_start_outcome(start)
            raise
        except NOT_IN_TIME as exc:
            await take_start_outcome(start)
            # No worker answered in time, or the server refused: the run (if it started) must not act later.
            # Its own deadline stops it; cancelling it also ends it at once when a worker sees it.
            await give_up(self.client, task_id)
            raise ApiError(503, MSG_UNAVAILABLE) from exc

    async def precheck(self, username: str, box_id: str) -> None:
        """The checks admission starts with that need no PVE, in the same order and by the same function
        (db.boxes.template_for); the run checks them again, for it may be started by others than this API."""
        try:
            await asyncio.to_thread(template_for, self.engine, username, box_id)
        except Refused as exc:
            raise ApiError(exc.failure.status, exc.message) from exc

    async def join(self, task_id: str, update: Any = CreateFromBoxWorkflow.admission) -> Any:
        """Wait for the admission of the run `task_id` (`update`: its workflow's admission update), which an
        earlier request started. That request gives the run up if it is not admitted in time; this one only
        answers 503."""
        try:
            return await asyncio.wait_for(
                self.client.get_workflow_handle(task_id).execute_update(update),
                self.timeout,
            )
        except WorkflowUpdateFailedError as exc:
            raise refusal(exc) from exc
        except RPCError as exc:
            # Often the run ended while we asked ("workflow execution already completed", "update was aborted by
            # closing workflow"): then its state holds the first answer, which the caller reads again.
            raise RunChanged(task_id) from exc
        except NOT_IN_TIME as exc:
            raise ApiError(503, MSG_UNAVAILABLE) from exc

    async def wait_for_end(self, task_id: str, seconds: float, waiters: Waiters) -> CreateFromBoxResult | None:
        """For ?wait=: answer what the run ended with (its result when it made the VM, whose VMID may differ
        from the one admitted: a collision on PVE moves it). A run still going after `seconds` answers as
        without wait (None), and so does a run whose end cannot be learnt (Temporal unreachable, an RPC error):
        the request is admitted and the run goes on, so a 5xx would only make a client without an
        Idempotency-Key retry it into a second VM."""
        if waiters.full():
            # Each waiter holds a connection and a long poll on Temporal: past the cap, answer at once.
            log.info("%d requests already wait for their runs; %s answers without waiting", waiters.cap, task_id)
            return None
        try:
            with waiters.holding():
                handle = self.client.get_workflow_handle(task_id, result_type=CreateFromBoxResult)
                return await asyncio.wait_for(handle.result(), seconds)
        except WorkflowFailureError as exc:
            cause = exc.cause
            if isinstance(cause, ApplicationError):
                raise ApiError(status_of(cause.type), cause.message) from exc
            # Cancelled (or terminated) by an operator: the run's state says how far it got (after the clone, the
            # configuration's message), and a run that ended without saying is a creation that failed.
            ended = await self._end_state(task_id)
            code = ended.result_code if ended is not None and ended.result_code else 500
            raise ApiError(code, ended.result_message if ended and ended.result_message else MSG_CLONE_FAILED) from exc
        except TimeoutError:
            return None
        except Exception:
            log.warning("could not learn how %s ended; answering its admission", task_id, exc_info=True)
            return None

    async def _end_state(self, task_id: str) -> TaskState | None:
        try:
            task = await find_task(self.client, task_id)
        except RPCError:
            return None
        return task.state if task is not None else None


class Waiters:
    """How many requests of this API process wait for their run's end (?wait), against a cap: each holds a
    connection and a long poll on Temporal. Past the cap a request is answered as without wait."""

    def __init__(self, cap: int):
        self.cap = cap
        self.count = 0

    def full(self) -> bool:
        return self.count >= self.cap

    @contextmanager
    def holding(self) -> Iterator[None]:
        self.count += 1
        try:
            yield
        finally:
            self.count -= 1


# ?wait requests waiting at once in one API process; more are answered as without wait (the run goes on).
MAX_WAITERS = 256


def refusal(exc: WorkflowUpdateFailedError) -> ApiError:
    cause = exc.cause
    if isinstance(cause, ApplicationError):
        return ApiError(status_of(cause.type), cause.message)
    return ApiError(500, MSG_CLONE_FAILED)


async def give_up(client: Client, task_id: str) -> None:
    try:
        await client.get_workflow_handle(task_id).cancel()
    except RPCError as exc:
        if exc.status != RPCStatusCode.NOT_FOUND:
            raise ApiError(503, MSG_UNAVAILABLE) from exc


async def take_start_outcome(start: WithStartWorkflowOperation[Any, Any]) -> None:
    """Take the outcome the SDK hands the start operation besides raising from the update call: an error left
    there is logged as "Future exception was never retrieved". When the update call failed with a start or
    RPC error, a timeout or a cancellation, the SDK has handed it over already (a cancelled call hands over
    CancelledError); the zero timeout keeps a start that never handed anything over from holding the answer.
    The update call's own error already says what happened, so the outcome itself is of no further use."""
    with suppress(TimeoutError, WorkflowAlreadyStartedError, RPCError, asyncio.CancelledError):
        async with asyncio.timeout(0):
            await start.workflow_handle()
