"""How the activities end when they refuse a request or PVE fails: the ApplicationErrors the workflows read, in
one place (the types are in payloads.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from temporalio.exceptions import ApplicationError, ApplicationErrorCategory

from payloads import PVE_TASK_FAILED, PVE_TASK_FAILED_TRANSIENT, VM_NOT_OURS, Failure
from pve.client import PveError
from pve.tasks import PveTaskFailed, is_transient_task_error


@contextmanager
def task_failures_final() -> Iterator[None]:
    """A PVE task that ended in error ends the activity; the error's type says if starting over may help."""
    try:
        yield
    except PveTaskFailed as exc:
        raise ApplicationError(
            f"PVE task failed: {exc}",
            type=PVE_TASK_FAILED_TRANSIENT if is_transient_task_error(str(exc)) else PVE_TASK_FAILED,
            non_retryable=True,
        ) from exc


def refuse(failure: Failure, message: str) -> ApplicationError:
    # BENIGN: a refused request is an answer, not a fault; it is not logged as a worker warning.
    return ApplicationError(message, type=failure.value, non_retryable=True, category=ApplicationErrorCategory.BENIGN)


def still_running(what: str) -> ApplicationError:
    # Retried by the caller's retry policy; BENIGN keeps these expected retries out of the worker's warnings.
    return ApplicationError(what, type="StillRunning", category=ApplicationErrorCategory.BENIGN)


def vm_not_ours(what: str) -> ApplicationError:
    # Final: the VM this task made is gone, and whatever holds its VMID now is not the task's to change.
    return ApplicationError(what, type=VM_NOT_OURS, non_retryable=True)


@contextmanager
def final_errors_as(failure: Failure, message: str | None = None) -> Iterator[None]:
    """PVE's final errors end the step with `failure`; PveUnavailable stays retryable."""
    try:
        yield
    except PveError as exc:
        raise ApplicationError(
            message or exc.message, f"PVE {exc.status}: {exc.message}", type=failure.value, non_retryable=True
        ) from exc
