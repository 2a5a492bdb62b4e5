"""Another team's workflow that creates a VM as one of its steps (a module of its own: the workflow sandbox
re-imports the module a workflow is defined in)."""

from __future__ import annotations

from temporalio import workflow
from temporalio.exceptions import ApplicationError, ChildWorkflowError
from temporalio.workflow import ParentClosePolicy

with workflow.unsafe.imports_passed_through():
    from workflows import CreateFromBoxInput, CreateFromBoxResult, CreateFromBoxWorkflow, LabInput, LabWorkflow


@workflow.defn
class ParentWorkflow:
    @workflow.run
    async def run(self, input: CreateFromBoxInput, task_queue: str) -> str:
        try:
            result: CreateFromBoxResult = await workflow.execute_child_workflow(
                CreateFromBoxWorkflow.run,
                input,
                id=f"{workflow.info().workflow_id}-vm",
                task_queue=task_queue,
                # As the README says: a child is cancelled (and cleans up) when the parent closes, never
                # terminated; and no execution timeout, which would terminate it mid-clone.
                parent_close_policy=ParentClosePolicy.REQUEST_CANCEL,
            )
        except ChildWorkflowError as err:
            assert isinstance(err.cause, ApplicationError)
            return f"failed: {err.cause.message}"
        return f"created {result.vm_name} as {result.vmid} on {result.node}"


@workflow.defn
class CourseWorkflow:
    """A course platform's workflow that makes a class's lab as one of its steps."""

    @workflow.run
    async def run(self, input: LabInput, task_queue: str) -> str:
        try:
            result = await workflow.execute_child_workflow(
                LabWorkflow.run,
                input,
                id=f"{workflow.info().workflow_id}-lab",
                task_queue=task_queue,
                parent_close_policy=ParentClosePolicy.REQUEST_CANCEL,
            )
        except ChildWorkflowError as err:
            assert isinstance(err.cause, ApplicationError)
            return f"failed: {err.cause.message}"
        return f"made {result.made}: " + ", ".join(f"{vm.vm_name}={vm.vmid}@{vm.node}" for vm in result.vms)
