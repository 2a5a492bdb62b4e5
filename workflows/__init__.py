"""Temporal workflows. Another workflow can run CreateFromBoxWorkflow as a child:

from workflows import CreateFromBoxWorkflow, CreateFromBoxInput
"""

from payloads import CreateFromBoxInput, CreateFromBoxResult
from workflows.create_from_box import SEARCH_ATTRIBUTES, CreateFromBoxWorkflow

__all__ = ["SEARCH_ATTRIBUTES", "CreateFromBoxInput", "CreateFromBoxResult", "CreateFromBoxWorkflow"]
