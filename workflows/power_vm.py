"""PowerVmWorkflow: start, shut down, stop or reboot one of the owner's VMs, in one PVE activity that acts only
on a VM carrying its creation's marker, neither being created nor being deleted.

Its workflow id is the power action's task id, `power-<vmid>-<ms>-<random>` (new_power_task_id): each request
is a task of its own. Other workflows run it as a child:

    from workflows import PowerVmWorkflow, PowerVmInput
"""

from __future__ import annotations

import dataclasses
import secrets
import time

from temporalio import workflow
from temporalio.client import Client
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from activities.vm_life import VmLifeActivities
    from db.vms import VmRecord
    from payloads import (
        MSG_POWER_DONE,
        MSG_POWER_FAILED,
        PowerFailure,
        PowerStep,
        PowerVmInput,
        PowerVmResult,
        TaskKind,
        TaskState,
    )
    from workflows import search_attributes
    from workflows.delete_vm import publish_task_state, vm_life_step
    from workflows.metadata import power_details, power_summary
    from workflows.policies import innermost_reason

POWER_PREFIX = "power-"


def new_power_task_id(vmid: int) -> str:
    """power-<vmid>-<ms>-<random>: readable in the Web UI, unique without coordination."""
    return f"{POWER_PREFIX}{vmid}-{int(time.time() * 1000)}-{secrets.token_hex(3)}"


@workflow.defn
class PowerVmWorkflow:
    def __init__(self) -> None:
        self._state = TaskState(owner="", kind=TaskKind.POWER.value, step=PowerStep.POWER.value)

    @workflow.query
    def state(self) -> TaskState:
        return self._state

    @workflow.run
    async def run(self, input: PowerVmInput) -> PowerVmResult:
        task_id = workflow.info().workflow_id
        self._state = initial_state(input)
        self._publish(PowerStep.POWER)
        try:
            done = await vm_life_step(VmLifeActivities.power_vm, input)
        except ActivityError as err:
            failure, message = _failure(err)
            self._end(failure.status, message)
            raise ApplicationError(message, innermost_reason(err), type=failure.value, non_retryable=True) from None
        self._state.vm_name, self._state.node = done.vm_name, done.node
        self._end(200, MSG_POWER_DONE)
        return dataclasses.replace(done, task_id=task_id)

    def _publish(self, step: PowerStep) -> None:
        publish_task_state(self._state, step.value)

    def _end(self, code: int, message: str) -> None:
        self._state.result_code = code
        self._state.result_message = message
        self._publish(PowerStep.DONE)


def initial_state(input: PowerVmInput, vm: VmRecord | None = None) -> TaskState:
    return TaskState(
        owner=input.username,
        kind=TaskKind.POWER.value,
        step=PowerStep.POWER.value,
        vmid=input.vmid,
        vm_name=vm.name if vm else "",
        node=vm.node if vm else "",
    )


def _failure(err: ActivityError) -> tuple[PowerFailure, str]:
    """What the action ends with: the refusals in their own words, anything else `Power action failed`."""
    cause = err.cause
    if isinstance(cause, ApplicationError) and cause.type in {f.value for f in PowerFailure}:
        return PowerFailure(cause.type), cause.message
    return PowerFailure.POWER_FAILED, MSG_POWER_FAILED


# ------------------------------------------------------------------------ starting one (not workflow code)


async def start_power(client: Client, task_queue: str, vm: VmRecord, action: str) -> str:
    """Start the power action `action` on the VM record `vm`; returns its task id. The memo holds the task's
    state from the start, so that it reads as a power action before a worker has picked it up. RPCError if
    Temporal cannot be asked."""
    task_id = new_power_task_id(vm.vmid)
    input = PowerVmInput(username=vm.username, vmid=vm.vmid, action=action)
    await client.start_workflow(
        PowerVmWorkflow.run,
        input,
        id=task_id,
        task_queue=task_queue,
        memo={"state": dataclasses.asdict(initial_state(input, vm))},
        search_attributes=search_attributes.at_start(input.username, node=vm.node, vmid=vm.vmid),
        static_summary=power_summary(input),
        static_details=power_details(input, vm.name, vm.node),
    )
    return task_id
