"""Recorded LabWorkflow histories replay on the current code: a change to the lab's commands that would break
labs running across a deploy fails here.

Recording the lab histories again (until the first release, in place):

    rm tests/histories/lab-1.0-*.json
    RECORD_HISTORIES=1.0 .venv/bin/pytest tests/test_lab_replay.py -k fresh_history -p no:cacheprovider
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.client import Client, WorkflowHistory

from tests.conftest import created_vms
from tests.factories import auth
from tests.recorded import Recorded
from tests.test_labs import LABS, fail_configure, lab, lab_end, teacher  # noqa: F401  (teacher: a fixture)
from tests.test_operators import reset
from tests.waiting import until
from workflows import LabWorkflow

# A VM retried on the other target, a lab cancelled while its VMs are made one at a time, and a lab reset by an
# operator while its VMs were made (the reset run's history: it waits for the creations begun before, and keeps
# their VMs).
SCENARIOS = ["retried", "cancelled", "reset"]
RECORDED = Recorded("lab-", LabWorkflow, SCENARIOS)


async def run_scenario(api: httpx.AsyncClient, temporal: Client, pve: Any, scenario: str) -> WorkflowHistory:
    pve.add_ceph_storage("ceph")
    if scenario == "retried":
        fail_configure(pve, "pve2", range(101, 102))  # the lab's second VM, placed on pve2
        request = lab(count=2, targets=["pve1", "pve2"], storage="ceph")
    elif scenario == "reset":
        pve.ceph_slow(1)
        request = lab(count=2, targets=["pve2"], storage="ceph")
    else:
        pve.ceph_slow(1)  # each clone takes 1 s
        request = lab(count=4, storage="ceph")
    answer = await api.post(LABS, json=request, headers=auth())
    assert answer.status_code == 200, answer.text
    task_id = answer.json()["data"]["task_id"]
    if scenario == "cancelled":
        await until(lambda: len(created_vms(pve)) >= 2, timeout=60)
        assert (await api.post(f"/api/v1/vm/manage/tasks/{task_id}/cancel", headers=auth())).status_code == 200
    if scenario == "reset":
        await until(lambda: len(created_vms(pve)) >= 1, timeout=60)
        reset(temporal, task_id)
    state = await lab_end(api, task_id)
    assert state["status"] == {"retried": "succeeded", "cancelled": "cancelled", "reset": "succeeded"}[scenario], state
    if scenario == "reset":
        assert len(created_vms(pve)) == 2 and [vm["status"] for vm in state["vms"]] == ["succeeded"] * 2
    if scenario == "retried":
        assert [vm["task_id"].endswith("-retry") for vm in state["vms"]] == [False, True]
    history = await temporal.get_workflow_handle(task_id).fetch_history()
    if scenario == "reset":
        # A reset run's history begins with the first run's start event, and the replayer takes the run id from
        # it; a worker knows its run's own id (which is how the run tells it was reset: workflows.policies).
        run_id = (await temporal.get_workflow_handle(task_id).describe()).run_id
        history.events[0].workflow_execution_started_event_attributes.original_execution_run_id = run_id
    return history


@pytest.mark.usefixtures("teacher", "one_clone_per_node", "worker")
@pytest.mark.fakepve(time_scale=1)
@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_fresh_history_replays(api: httpx.AsyncClient, temporal: Client, pve: Any, scenario: str) -> None:
    await RECORDED.replay_fresh(await run_scenario(api, temporal, pve, scenario), scenario)


def test_every_version_has_every_scenario_recorded() -> None:
    RECORDED.assert_every_scenario_recorded()


@pytest.mark.parametrize("path", RECORDED.paths(), ids=lambda path: path.stem)
async def test_recorded_history_replays(path: Path) -> None:
    scenario, last = await RECORDED.replay(path)
    if scenario in ("retried", "reset"):
        assert last.HasField("workflow_execution_completed_event_attributes")
    else:
        assert last.HasField("workflow_execution_canceled_event_attributes")
