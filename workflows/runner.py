"""How the worker runs the workflows: in the SDK's sandbox, with the project's modules passed through, less the
sandbox's toll on every payload.

For each payload sequence it encodes or decodes (an activity's input and result, a memo, a summary: about 80 per
creation, each visited three times), the SDK asks the sandboxed workflow instance which serialization context
applies, and asks by compiling and running two lines of code inside the sandbox with its import guards swapped
in. The answer is a lookup in the instance's own tables (its pending activities, child workflows, signals),
which touches no module the sandbox guards. `workflow_runner()` asks the instance directly instead: 17 % less
of the worker's CPU per creation, 8 % more creations a second (figure 4 of `make bench`, measured side by side).
The workflow code itself still runs in the sandbox, as before.

This leans on the SDK's private `_Instance` (temporalio 1.35, as pyproject.toml allows): tests/test_runner.py
checks that every answer is the SDK's own, so an upgrade that changes those insides fails there first. An
instance without the sandboxed side where this expects it takes the SDK's own way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from temporalio.worker import WorkflowInstance, WorkflowInstanceDetails, WorkflowRunner
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions
from temporalio.worker.workflow_sandbox import _runner as sdk_runner

# The name under which the SDK's _Instance keeps the sandboxed side (temporalio's workflow_sandbox/_runner.py).
IN_SANDBOX = "__temporal_in_sandbox"


def workflow_runner(passthrough_modules: Sequence[str]) -> WorkflowRunner:
    """The sandboxed runner with `passthrough_modules` imported once for all runs (the sandbox would import them
    afresh for every run), asking for serialization contexts directly when the SDK is as expected."""
    return DirectContextRunner(restrictions=SandboxRestrictions.default.with_passthrough_modules(*passthrough_modules))


class DirectContextRunner(SandboxedWorkflowRunner):
    def create_instance(self, det: WorkflowInstanceDetails) -> WorkflowInstance:
        return _DirectContextInstance(det, self.runner_class, self.restrictions)


class _DirectContextInstance(sdk_runner._Instance):
    """The SDK's sandboxed instance, answering the two context questions without a round through the sandbox.
    Whatever is not as expected (no sandboxed side under IN_SANDBOX) takes the SDK's way."""

    def get_serialization_context(self, command_info: Any) -> Any:
        inside: Any = self.globals_and_locals.get(IN_SANDBOX)
        if inside is None:
            return super().get_serialization_context(command_info)
        return inside.get_serialization_context(command_info)

    def get_external_store_context(self, command_info: Any) -> Any:
        inside: Any = self.globals_and_locals.get(IN_SANDBOX)
        if inside is None:
            return super().get_external_store_context(command_info)
        return inside.get_external_store_context(command_info)
