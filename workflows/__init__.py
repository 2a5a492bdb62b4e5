"""Temporal workflows. Another workflow can run CreateFromBoxWorkflow or DeleteVmWorkflow as a child:

from workflows import CreateFromBoxWorkflow, CreateFromBoxInput
from workflows import DeleteVmWorkflow, DeleteVmInput
"""

from temporalio import workflow

# The sandbox re-imports this package for every run: the payload types are passed through, not rebuilt.
with workflow.unsafe.imports_passed_through():
    from payloads import CreateFromBoxInput, CreateFromBoxResult, DeleteVmInput, DeleteVmResult

from workflows.create_from_box import SEARCH_ATTRIBUTES, CreateFromBoxWorkflow
from workflows.delete_vm import DeleteVmWorkflow

__all__ = [
    "SEARCH_ATTRIBUTES",
    "CreateFromBoxInput",
    "CreateFromBoxResult",
    "CreateFromBoxWorkflow",
    "DeleteVmInput",
    "DeleteVmResult",
    "DeleteVmWorkflow",
]
