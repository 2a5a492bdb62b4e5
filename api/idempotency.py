"""Idempotency-Key: a retried POST answers what the first one answered and creates nothing new, whichever API
process it reaches. The user and key name the run (a keyed task id), and every run keeps the digest of the
request that started it in its memo, so that the same key with another request is refused."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError

from api.errors import ApiError
from api.task_state import Task, find_task
from payloads import MSG_CLONE_FAILED, MSG_UNAVAILABLE, Admission, CreateFromBoxInput, LabAdmission, LabInput, LabVm
from workflows import LabWorkflow
from workflows.lab import ADMISSION_MEMO

if TYPE_CHECKING:  # api.admission records request_memo() on every run it starts
    from api.admission import Admitter

MSG_KEY_REUSED = "This Idempotency-Key was already used with a different request"
# The memo key under which a run keeps the digest of the request that started it.
REQUEST_MEMO = "request"
A = TypeVar("A")
# Looks at the key's run, each after a concurrent repeat started it between our look and our own start.
ATTEMPTS = 3


def keyed_task_id(username: str, key: str, prefix: str = "clone") -> str:
    """The same user and Idempotency-Key always name the same run, whichever API process is asked (`lab` for a
    lab: a key used for a VM and for a lab names two runs)."""
    return f"{prefix}-k" + hashlib.sha256(f"{username}\0{key}".encode()).hexdigest()[:32]


def request_digest(input: CreateFromBoxInput | LabInput) -> str:
    fields = dataclasses.asdict(input)
    fields.pop("admit_by")  # set anew by each attempt
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def request_memo(input: CreateFromBoxInput | LabInput) -> dict[str, str]:
    return {REQUEST_MEMO: request_digest(input)}


class RunChanged(Exception):
    """Joining a run's admission failed at once: read the run again (it may have ended meanwhile)."""


async def admit_once(admitter: Admitter, username: str, key: str, input: CreateFromBoxInput) -> Admission:
    """Admit under an Idempotency-Key: the first request starts the run (keyed_task_id); a repeat of it gets
    the first answer; the same key with another request (a lab's included) is refused."""
    keyed = Keyed(keyed_task_id(username, key), keyed_task_id(username, key, "lab"))
    return await _once(admitter, keyed, input, admitter.admit, admitter.join, first_answer)  # type: ignore[arg-type]


async def admit_lab_once(admitter: Admitter, username: str, key: str, input: LabInput) -> LabAdmission:
    """admit_once for a lab."""

    async def join(task_id: str) -> LabAdmission:
        return await admitter.join(task_id, LabWorkflow.admission)  # type: ignore[no-any-return]

    keyed = Keyed(keyed_task_id(username, key, "lab"), keyed_task_id(username, key))
    return await _once(admitter, keyed, input, admitter.admit_lab, join, first_lab_answer)  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True)
class Keyed:
    task_id: str  # the run the key names for this kind of request
    other: str  # the run it names for the other kind (a VM's, a lab's): one of them at most may exist


async def _once(
    admitter: Admitter,
    keyed: Keyed,
    input: CreateFromBoxInput | LabInput,
    admit: Callable[[str, Any], Awaitable[A]],
    join: Callable[[str], Awaitable[A]],
    answer: Callable[[Task], A],
) -> A:
    digest = request_digest(input)
    task_id = keyed.task_id
    for _ in range(ATTEMPTS):
        try:
            task = await find_task(admitter.client, task_id)
        except RPCError as exc:
            raise ApiError(503, MSG_UNAVAILABLE) from exc
        if task is not None and task.memo.get(REQUEST_MEMO) != digest:
            # Another request under this key, also after it answered 503: a key names one request for good.
            raise ApiError(422, MSG_KEY_REUSED)
        if task is None or given_up(task):
            # Nothing was created under this key (or the earlier attempt answered 503): start afresh, unless the
            # key was used for the other kind of request (one more look, on a key's first request only).
            if await _used_for_the_other_kind(admitter, keyed.other):
                raise ApiError(422, MSG_KEY_REUSED)
            try:
                return await admit(task_id, input)
            except WorkflowAlreadyStartedError:
                continue  # a concurrent repeat started it first: answer what it answers
        if not task.ended:
            try:
                return await join(task_id)
            except RunChanged:
                continue  # it ended while we asked: the next look reads its first answer
        return answer(task)
    raise ApiError(503, MSG_UNAVAILABLE)


async def _used_for_the_other_kind(admitter: Admitter, other_task_id: str) -> bool:
    try:
        other = await find_task(admitter.client, other_task_id)
    except RPCError as exc:
        raise ApiError(503, MSG_UNAVAILABLE) from exc
    return other is not None and not given_up(other)


def given_up(task: Task) -> bool:
    """The run ended unadmitted because its request answered 503, or before a worker ever ran it (its state is
    still the one the API started it with: no VMID, no result)."""
    state = task.state
    return task.ended and (state is None or (state.vmid is None and not state.vms and state.result_code in (None, 503)))


def first_answer(task: Task) -> Admission:
    """What the first request answered, read from its ended run: the admission (the 200), or the refusal."""
    state = task.state
    assert state is not None, "an ended run without a state is given up"
    if state.vmid is not None:
        return Admission(task_id=task.id, vmid=state.vmid, vm_name=state.vm_name, node=state.node)
    raise ApiError(state.result_code or 500, state.result_message or MSG_CLONE_FAILED)


def first_lab_answer(task: Task) -> LabAdmission:
    """first_answer for a lab: the admission its POST answered, which the lab keeps in its memo."""
    admission = task.memo.get(ADMISSION_MEMO)
    if admission is not None:
        return LabAdmission(task_id=task.id, vms=[LabVm(**vm) for vm in admission["vms"]])
    state = task.state
    assert state is not None, "an ended run without a state is given up"
    raise ApiError(state.result_code or 500, state.result_message or MSG_CLONE_FAILED)
