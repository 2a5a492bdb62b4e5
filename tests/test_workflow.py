"""The workflow's outside face for other workflows (child workflow, input and result dataclasses), and replay
of recorded histories: a change to the workflow must keep the runs already in flight replayable.

Histories are named <version>-<scenario>.json, one of each SCENARIOS per version. 1.0 is from before admission
took the clone slot (its runs ask for it in a step of their own: `Admitted.clone_slot` is None, and the workflow
keeps that path for them); 1.1 from before admission said `changes_only` (they publish their memo and every
search attribute at each step: the workflow keeps that for runs admitted so); 1.2 from before admission said
`steps_merged` (they free the clone slot and record the VM in local activities of their own); 1.3 from before
admission said `configure_with_clone` (the configuration is an activity of its own after the clone's); 1.4
since. Three scenarios are recorded from 1.4 on only (`Recorded.since`): `configure_retried` (the clone's
activity leaves the configuration to the run's own step), `started` (the request's `start`) and `vmid_taken`
(a run that waited for a clone slot finds its VMID made by hand, and takes another). A change to the workflow
that only the latest version's runs see re-records that version in place:

    rm tests/histories/1.4-*.json
    RECORD_HISTORIES=1.4 .venv/bin/pytest tests/test_workflow.py -k fresh_history -p no:cacheprovider

Until the first release, a change of the command sequence keeps the old ones: the new path is taken only by runs
whose admission says so (a field of `Admitted`, as above), and its histories are recorded beside them as the next
version. From the first release on, README.md ("Changing a workflow once it is released") says how.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine
from sqlmodel import select
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowFailureError, WorkflowHistory
from temporalio.worker import Replayer, Worker

from db.engine import session
from db.models import COMMITTED, CloneSlot
from payloads import MSG_BOX_NOT_FOUND, MSG_CLONE_FAILED, MSG_CONFIGURE_FAILED
from settings import Settings
from tests.conftest import created_vms, reservations, result_of, vm_records
from tests.factories import BOX, auth, body
from tests.parent_workflow import ParentWorkflow
from tests.recorded import HISTORIES, Recorded
from tests.waiting import until
from workflows import CreateFromBoxInput, CreateFromBoxWorkflow


def child_input(**overrides: Any) -> CreateFromBoxInput:
    values: dict[str, Any] = dict(
        username="alice", box_id=BOX, name="child-vm", target="pve2", cpu_cores=1, memory_mb=1024, disk_gb=10
    )
    values.update(overrides)
    return CreateFromBoxInput(**values)


@pytest.mark.usefixtures("worker")
async def test_runs_as_a_child_workflow(temporal: Client, settings: Settings, pve: Any) -> None:
    parent_queue = f"parent-{uuid.uuid4().hex[:8]}"
    async with Worker(temporal, task_queue=parent_queue, workflows=[ParentWorkflow]):
        ok = await temporal.execute_workflow(
            ParentWorkflow.run,
            args=[child_input(), settings.temporal_task_queue],
            id=f"parent-{uuid.uuid4().hex[:8]}",
            task_queue=parent_queue,
        )
        refused = await temporal.execute_workflow(
            ParentWorkflow.run,
            args=[child_input(box_id="missing"), settings.temporal_task_queue],
            id=f"parent-{uuid.uuid4().hex[:8]}",
            task_queue=parent_queue,
        )
        # A child id the owner marker cannot carry: refused at admission, not failed at the clone.
        odd_id = await temporal.execute_workflow(
            ParentWorkflow.run,
            args=[child_input(name="odd-vm"), settings.temporal_task_queue],
            id=f"course:{uuid.uuid4().hex[:8]}",
            task_queue=parent_queue,
        )
    assert ok == "created child-vm as 100 on pve2"
    assert refused == f"failed: {MSG_BOX_NOT_FOUND}"
    assert odd_id.startswith("failed: Invalid task id 'course:") and "letters, digits" in odd_id, odd_id
    assert not [r for r in pve.requests if r[0] == "POST" and r[1].endswith("/clone")][1:]  # one clone: ok's
    # storage None in the input: the worker's DEFAULT_STORAGE (NFS) was used.
    [vm] = created_vms(pve)
    assert vm.config["scsi0"].startswith("NFS:")


@pytest.mark.usefixtures("worker")
@pytest.mark.fakepve(time_scale=1)
async def test_a_parent_terminated_mid_clone_has_its_child_cancelled_and_cleaned_up(
    temporal: Client, settings: Settings, pve: Any, engine: Engine
) -> None:
    pve.add_ceph_storage("ceph")
    pve.ceph_slow(4)  # the child is still cloning when its parent is terminated
    parent_queue = f"parent-{uuid.uuid4().hex[:8]}"
    parent_id = f"parent-{uuid.uuid4().hex[:8]}"
    async with Worker(temporal, task_queue=parent_queue, workflows=[ParentWorkflow]):
        parent = await temporal.start_workflow(
            ParentWorkflow.run,
            args=[child_input(storage="ceph"), settings.temporal_task_queue],
            id=parent_id,
            task_queue=parent_queue,
        )
        await until(lambda: len(created_vms(pve)) == 1)  # the clone is under way
        # The parent closes without running any code of its own (as on a timeout): only the close policy
        # (REQUEST_CANCEL, not the default TERMINATE) gets the child to clean up.
        await parent.terminate()
        child = temporal.get_workflow_handle(f"{parent_id}-vm")
        with pytest.raises(WorkflowFailureError):
            await asyncio.wait_for(child.result(), 60)
        assert (await child.describe()).status == WorkflowExecutionStatus.CANCELED
    assert created_vms(pve) == []
    assert [r.state for r in reservations(engine)] == ["released"]


# --------------------------------------------------------------------------------- replay


async def run_scenario(api: httpx.AsyncClient, temporal: Client, pve: Any, scenario: str) -> WorkflowHistory:
    if scenario == "clone_failure":
        pve.storages["NFS"]["avail"] = 1024**3
    elif scenario == "compensation":
        pve.fail("PUT", "/nodes/pve2/qemu/100/config", 500, "unable to apply the new configuration")
    elif scenario == "configure_retried":
        # The clone's activity tries the configuration once; PVE's lock timeout leaves it to the run's own step.
        pve.fail("PUT", "/nodes/pve2/qemu/100/config", error="config_lock_timeout", times=1)
    request = body(start=True) if scenario == "started" else body()
    response = await api.post("/api/v1/vm/manage/createFromBoxTemplate", json=request, headers=auth())
    task_id = response.json()["data"]["task_id"]
    if scenario == "cancel_during_clone_request":
        pve.slow_network(2.0, node="pve1")  # the clone request (to the template's node) takes 2 s
        await asyncio.sleep(0.8)
        await temporal.get_workflow_handle(task_id).cancel()
    try:
        await result_of(temporal, task_id)
    except Exception as err:
        assert scenario not in ("success", "configure_retried", "started"), err
    return await temporal.get_workflow_handle(task_id).fetch_history()


CREATE = "/api/v1/vm/manage/createFromBoxTemplate"
SCENARIOS = ["success", "clone_failure", "compensation", "cancel_during_clone_request", "configure_retried", "started"]
# The configuration left to the run's own step, the start, and a VMID replaced, as runs admitted since 1.4 take
# them (vmid_taken needs a clone slot to wait for: a test of its own below).
RECORDED = Recorded(
    "",
    CreateFromBoxWorkflow,
    [*SCENARIOS, "vmid_taken"],
    since={"configure_retried": "1.4", "started": "1.4", "vmid_taken": "1.4"},
)


@pytest.mark.usefixtures("worker")
@pytest.mark.parametrize(
    "scenario",
    [
        pytest.param(s, marks=pytest.mark.fakepve(time_scale=1)) if s == "cancel_during_clone_request" else s
        for s in SCENARIOS
    ],
)
async def test_fresh_history_replays(api: httpx.AsyncClient, temporal: Client, pve: Any, scenario: str) -> None:
    await RECORDED.replay_fresh(await run_scenario(api, temporal, pve, scenario), scenario)


@pytest.mark.usefixtures("one_clone_per_node", "worker")
@pytest.mark.fakepve(time_scale=1)
async def test_fresh_history_replays_vmid_taken(api: httpx.AsyncClient, temporal: Client, pve: Any) -> None:
    # The second creation waits for the first's clone slot; meanwhile someone makes its VMID by hand.
    pve.add_ceph_storage("ceph")
    pve.ceph_slow(2)
    first = await api.post(CREATE, json=body(name="first", storage="ceph", cpuCores=1), headers=auth())
    second = await api.post(CREATE, json=body(name="second", storage="ceph", cpuCores=1), headers=auth())
    assert (first.json()["data"]["vmid"], second.json()["data"]["vmid"]) == ("100", "101")
    pve.add_vm(101, "made-by-hand", node="pve2")
    task_id = second.json()["data"]["task_id"]
    assert (await result_of(temporal, task_id)).vmid == 102
    await RECORDED.replay_fresh(await temporal.get_workflow_handle(task_id).fetch_history(), "vmid_taken")


@pytest.mark.usefixtures("worker")
async def test_a_creation_publishes_only_what_changes_between_its_first_and_last_steps(
    api: httpx.AsyncClient, temporal: Client, pve: Any, engine: Engine
) -> None:
    # The first step and the last publish everything; between them only BoxStep and VmId move (at the clone), not
    # the memo: each write is an event, a command and a visibility update.
    history = await run_scenario(api, temporal, pve, "success")
    kinds = [event.event_type for event in history.events]
    assert kinds.count(EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES) == 3
    assert kinds.count(EventType.EVENT_TYPE_WORKFLOW_PROPERTIES_MODIFIED) == 2
    # Two local activities (admission, record) and one activity: the clone's frees the clone slot, then configures
    # the VM (activities/creation.py), a workflow turn fewer for each than as an activity of its own. The record,
    # in the workflow task that takes the clone's answer, ends the run in that same task.
    assert kinds.count(EventType.EVENT_TYPE_MARKER_RECORDED) == 2
    scheduled = [
        event.activity_task_scheduled_event_attributes.activity_type.name
        for event in history.events
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
    ]
    assert scheduled == ["start_clone"]
    [record] = vm_records(engine)
    assert (record.task_id, record.vmid) == (history.workflow_id, 100)
    [vm] = created_vms(pve)
    assert (vm.vmid, vm.config["cores"], vm.config["memory"]) == (100, "2", "2048")  # configured, by the clone's
    assert [r.state for r in reservations(engine)] == [COMMITTED]
    with session(engine) as db:
        assert db.exec(select(CloneSlot)).all() == []  # freed by the clone's activity
    task_id = history.workflow_id
    state = (await api.get(f"/api/v1/vm/manage/tasks/{task_id}", headers=auth())).json()["data"]
    assert (state["status"], state["step"], state["vmid"], state["result_code"]) == ("succeeded", "done", "100", 200)


@pytest.mark.parametrize("path", sorted(HISTORIES.glob("1.1-*.json")), ids=lambda path: path.stem)
async def test_a_run_an_older_worker_began_replays_here_though_the_api_set_boxstep(path: Path) -> None:
    # A rolling upgrade: the new API starts a run with BoxStep, an older worker admits it and publishes
    # everything at each step, then this worker picks it up. Its admission (`changes_only` unset) decides the
    # path, not what the run was started with.
    history = json.loads(path.read_text())
    started = history["events"][0]["workflowExecutionStartedEventAttributes"]
    newer = json.loads(next(HISTORIES.glob("1.2-*.json")).read_text())["events"][0]
    box_step = newer["workflowExecutionStartedEventAttributes"]["searchAttributes"]["indexedFields"]["BoxStep"]
    started["searchAttributes"]["indexedFields"]["BoxStep"] = box_step
    replayed = WorkflowHistory.from_json(path.stem, json.dumps(history))
    result = await Replayer(workflows=[CreateFromBoxWorkflow]).replay_workflow(replayed, raise_on_replay_failure=False)
    assert result.replay_failure is None, result.replay_failure


def test_every_version_has_every_scenario_recorded() -> None:
    RECORDED.assert_every_scenario_recorded()


@pytest.mark.parametrize("path", RECORDED.paths(), ids=lambda path: path.stem)
async def test_recorded_history_replays(path: Path) -> None:
    # What the recorded run ended with is what the current code decides on replay too.
    scenario, last = await RECORDED.replay(path)
    if scenario in ("success", "configure_retried", "started", "vmid_taken"):
        assert last.HasField("workflow_execution_completed_event_attributes")
    elif scenario == "cancel_during_clone_request":
        assert last.HasField("workflow_execution_canceled_event_attributes")
    else:
        message = last.workflow_execution_failed_event_attributes.failure.message
        assert message == {"clone_failure": MSG_CLONE_FAILED, "compensation": MSG_CONFIGURE_FAILED}[scenario]
