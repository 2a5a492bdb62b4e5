"""workflows/runner.py: the worker's sandboxed runner answers every serialization-context question exactly as the
SDK's own way through the sandbox would, over every recorded history of every workflow (an SDK upgrade that
changes the insides it leans on fails here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer, WorkflowInstance, WorkflowInstanceDetails
from temporalio.worker.workflow_sandbox import _runner as sdk_runner

from tests.recorded import HISTORIES
from worker import PROJECT_MODULES
from workflows import CreateFromBoxWorkflow, DeleteVmWorkflow, LabWorkflow, PowerVmWorkflow
from workflows.runner import IN_SANDBOX, DirectContextRunner, _DirectContextInstance, workflow_runner

WORKFLOWS = [CreateFromBoxWorkflow, DeleteVmWorkflow, PowerVmWorkflow, LabWorkflow]


class _Compared(_DirectContextInstance):
    """Answers the direct way, and checks each answer against the SDK's own (through the sandbox)."""

    asked: ClassVar[list[str]] = []

    def get_serialization_context(self, command_info: Any) -> Any:
        assert self.globals_and_locals.get(IN_SANDBOX) is not None, "the SDK's insides moved: no direct answers"
        direct = super().get_serialization_context(command_info)
        assert direct == sdk_runner._Instance.get_serialization_context(self, command_info)
        self.asked.append("serialization")
        return direct

    def get_external_store_context(self, command_info: Any) -> Any:
        direct = super().get_external_store_context(command_info)
        assert direct == sdk_runner._Instance.get_external_store_context(self, command_info)
        self.asked.append("external store")
        return direct


class _ComparingRunner(DirectContextRunner):
    def create_instance(self, det: WorkflowInstanceDetails) -> WorkflowInstance:
        return _Compared(det, self.runner_class, self.restrictions)


def test_the_worker_runs_workflows_in_the_sandbox_with_the_direct_answers() -> None:
    runner = workflow_runner(PROJECT_MODULES)
    assert isinstance(runner, DirectContextRunner)
    assert set(PROJECT_MODULES) <= set(runner.restrictions.passthrough_modules)


@pytest.mark.parametrize("path", sorted(HISTORIES.glob("*.json")), ids=lambda path: path.stem)
async def test_every_answer_is_the_sdks_own(path: Path) -> None:
    _Compared.asked = []
    worker_runner = workflow_runner(PROJECT_MODULES)
    assert isinstance(worker_runner, DirectContextRunner)
    runner = _ComparingRunner(restrictions=worker_runner.restrictions)
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    result = await Replayer(workflows=WORKFLOWS, workflow_runner=runner).replay_workflow(
        history, raise_on_replay_failure=False
    )
    assert result.replay_failure is None, result.replay_failure
    # Asked about every payload: the activities' inputs and results, the memo, the summaries.
    assert _Compared.asked.count("serialization") >= 10
    assert "external store" in _Compared.asked
