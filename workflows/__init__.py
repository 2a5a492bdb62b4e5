"""Temporal workflows. Another workflow can run CreateFromBoxWorkflow, DeleteVmWorkflow or PowerVmWorkflow as a
child:

from workflows import CreateFromBoxWorkflow, CreateFromBoxInput
from workflows import DeleteVmWorkflow, DeleteVmInput
from workflows import PowerVmWorkflow, PowerVmInput
from workflows import LabWorkflow, LabInput
"""

from temporalio import workflow

# The sandbox re-imports this package for every run: the payload types are passed through, not rebuilt.
with workflow.unsafe.imports_passed_through():
    from payloads import (
        CreateFromBoxInput,
        CreateFromBoxResult,
        DeleteVmInput,
        DeleteVmResult,
        LabInput,
        LabResult,
        PowerVmInput,
        PowerVmResult,
    )

from workflows.create_from_box import SEARCH_ATTRIBUTES, CreateFromBoxWorkflow
from workflows.delete_vm import DeleteVmWorkflow
from workflows.lab import LabWorkflow
from workflows.power_vm import PowerVmWorkflow

__all__ = [
    "SEARCH_ATTRIBUTES",
    "CreateFromBoxInput",
    "CreateFromBoxResult",
    "CreateFromBoxWorkflow",
    "DeleteVmInput",
    "DeleteVmResult",
    "DeleteVmWorkflow",
    "LabInput",
    "LabResult",
    "LabWorkflow",
    "PowerVmInput",
    "PowerVmResult",
    "PowerVmWorkflow",
]
