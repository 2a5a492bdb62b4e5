"""Recorded workflow histories (tests/histories/<prefix><version>-<scenario>.json): each workflow's replay tests
(tests/test_workflow.py, test_delete_vm.py, test_power_vm.py, test_lab_replay.py) record, list and replay them
through one `Recorded`. A recorded history that no longer replays is a change that would break the runs of that
workflow still going across a deploy."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

HISTORIES = Path(__file__).parent / "histories"


@dataclass(frozen=True)
class Recorded:
    prefix: str  # "" for the creation's histories, "delete-", "power-", "lab-"
    workflow: type[Any]
    scenarios: list[str]
    # A scenario recorded only from a version on (the path it shows came later): scenario -> that version.
    since: dict[str, str] = field(default_factory=dict)

    def paths(self) -> list[Path]:
        return sorted(HISTORIES.glob(f"{self.prefix}[0-9]*.json"))

    async def replay_fresh(self, history: WorkflowHistory, scenario: str) -> None:
        """A history just made replays; with RECORD_HISTORIES=<version> it is recorded as that version's."""
        await Replayer(workflows=[self.workflow]).replay_workflow(history)
        version = os.environ.get("RECORD_HISTORIES")
        if version:
            HISTORIES.mkdir(exist_ok=True)
            (HISTORIES / f"{self.prefix}{version}-{scenario}.json").write_text(history.to_json())

    def assert_every_scenario_recorded(self) -> None:
        recorded = {path.stem.removeprefix(self.prefix) for path in self.paths()}
        versions = {stem.split("-", 1)[0] for stem in recorded}
        assert versions, f"no recorded {self.workflow.__name__} histories: record them (see its test file's top)"
        assert recorded == {
            f"{version}-{scenario}"
            for version in versions
            for scenario in self.scenarios
            if _version(version) >= _version(self.since.get(scenario, "0"))
        }

    async def replay(self, path: Path) -> tuple[str, HistoryEvent]:
        """Replays a recorded history on the current code; returns its scenario and its last event (how the
        recorded run ended, which the caller checks)."""
        history = WorkflowHistory.from_json(f"recorded-{path.stem}", path.read_text())
        result = await Replayer(workflows=[self.workflow]).replay_workflow(history, raise_on_replay_failure=False)
        assert result.replay_failure is None, result.replay_failure
        return path.stem.removeprefix(self.prefix).split("-", 1)[1], history.events[-1]


def _version(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))
