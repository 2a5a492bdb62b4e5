"""Temporal workflows. Another workflow can run CreateFromBoxWorkflow as a child:

from workflows import CreateFromBoxWorkflow, CreateFromBoxInput
"""

from temporalio import workflow

# The sandbox re-imports this package for every run: the payload types are passed through, not rebuilt.
with workflow.unsafe.imports_passed_through():
    from payloads import CreateFromBoxInput, CreateFromBoxResult

from workflows.create_from_box import SEARCH_ATTRIBUTES, CreateFromBoxWorkflow

__all__ = ["SEARCH_ATTRIBUTES", "CreateFromBoxInput", "CreateFromBoxResult", "CreateFromBoxWorkflow"]
