"""Labs end to end: POST labs, the lab's task state, DELETE labs/{task_id} and cancelling a lab, against fakepve
and a real Temporal dev server, with the state of PVE and of the database checked afterwards."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.worker import Worker

import worker as worker_module
from api.idempotency import MSG_KEY_REUSED
from db.load import load_admin_data
from db.models import HELD
from payloads import MSG_BOX_NOT_FOUND, MSG_INVALID_NAME, MSG_TOTAL_LIMIT, LabInput
from pve.client import PveClient
from pve.ownership import is_owned_by
from settings import Settings
from tests.conftest import created_vms, reservations, vm_records
from tests.factories import ADMIN_DATA, BOB, BOX, auth, body
from tests.parent_workflow import CourseWorkflow
from tests.waiting import until

LABS = "/api/v1/vm/manage/labs"
TASKS = "/api/v1/vm/manage/tasks"
# A plan a class fits in: room for 100 small VMs.
CLASS_PLAN = {
    "id": "class",
    "name": "Class",
    "per_vm": {"cores": 4, "memory_mb": 8192, "disk_gb": 100},
    "total": {"cores": 400, "memory_mb": 409600, "disk_gb": 10000, "vms": 120},
}


@pytest.fixture
def teacher(engine: Engine) -> None:
    """alice on the class plan."""
    users = [{**u, "plan": "class"} if u["username"] == "alice" else u for u in ADMIN_DATA["users"]]
    load_admin_data(engine, {**ADMIN_DATA, "plans": [*ADMIN_DATA["plans"], CLASS_PLAN], "users": users})


def lab(**overrides: Any) -> dict[str, Any]:
    request: dict[str, Any] = {
        "box_id": BOX,
        "name": "class",
        "count": 12,
        "cpuCores": 1,
        "memorySize": 512,
        "diskSize": 10,
    }
    request.update(overrides)
    return {k: v for k, v in request.items() if v is not ...}


async def post_lab(api: httpx.AsyncClient, **overrides: Any) -> dict[str, Any]:
    """POST labs as alice, which must answer 200; returns its `data`."""
    answer = await api.post(LABS, json=lab(**overrides), headers=auth())
    assert answer.status_code == 200, answer.text
    data: dict[str, Any] = answer.json()["data"]
    return data


async def lab_state(api: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    answer = await api.get(f"{TASKS}/{task_id}", headers=auth())
    assert answer.status_code == 200, answer.text
    data: dict[str, Any] = answer.json()["data"]
    return data


async def lab_end(api: httpx.AsyncClient, task_id: str, timeout: float = 90) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        state = await lab_state(api, task_id)
        if state["status"] != "running":
            return state
        assert asyncio.get_running_loop().time() < deadline, f"lab still running: {state}"
        await asyncio.sleep(0.2)


def owned_vms(pve: Any) -> dict[int, Any]:
    return {vm.vmid: vm for vm in created_vms(pve)}


def fail_configure(pve: Any, node: str, vmids: range) -> None:
    """Configuring these VMIDs on `node` fails for good (PVE refuses the parameters)."""
    for vmid in vmids:
        pve.fail("PUT", f"/nodes/{node}/qemu/{vmid}/config", 400, "parameter verification failed")


@pytest.mark.usefixtures("teacher", "worker")
async def test_a_lab_of_12_is_spread_over_3_nodes(api: httpx.AsyncClient, pve: Any, engine: Engine) -> None:
    pve.add_node("pve3")
    answer = await api.post(LABS, json=lab(), headers=auth())
    assert answer.status_code == 200, answer.text
    assert answer.json()["message"] == "Lab creation started"
    data = answer.json()["data"]
    assert data["task_id"].startswith("lab-")
    vms = data["vms"]
    assert [vm["vm_name"] for vm in vms] == [f"class-{n:02d}" for n in range(1, 13)]
    assert len({vm["vmid"] for vm in vms}) == 12 and len({vm["task_id"] for vm in vms}) == 12
    assert Counter(vm["node"] for vm in vms) == {"pve1": 4, "pve2": 4, "pve3": 4}

    state = await lab_end(api, data["task_id"])
    assert (state["status"], state["kind"], state["step"]) == ("succeeded", "lab", "done")
    assert (state["result_code"], state["result_message"]) == (200, "Created 12 of 12 VMs")
    assert [vm["status"] for vm in state["vms"]] == ["succeeded"] * 12
    on_pve = owned_vms(pve)
    assert len(on_pve) == 12
    for vm in vms:
        made = on_pve[int(vm["vmid"])]
        assert (made.name, made.node) == (vm["vm_name"], vm["node"])
        assert is_owned_by(str(made.config.get("description", "")), vm["task_id"])  # its own creation's marker
    assert sorted(r.task_id for r in vm_records(engine)) == sorted(vm["task_id"] for vm in vms)
    assert reservations(engine, HELD) == []
    # Each VM is its own task, listed among the caller's tasks beside the lab.
    # (Other tests of the session share the Temporal server: only this lab's tasks are counted.)
    listed = (await api.get(TASKS, params={"limit": 200}, headers=auth())).json()["data"]["tasks"]
    ours = [task for task in listed if task["task_id"].startswith(data["task_id"])]
    assert Counter(task["kind"] for task in ours) == {"create": 12, "lab": 1}
    mine = (await api.get("/api/v1/vm/manage/vms", headers=auth())).json()["data"]["vms"]
    assert sorted(vm["task_id"] for vm in mine) == sorted(vm["task_id"] for vm in vms)


@pytest.mark.usefixtures("worker")
async def test_a_lab_over_the_plan_is_refused_with_nothing_created(
    api: httpx.AsyncClient, pve: Any, engine: Engine, temporal: Client, settings: Settings
) -> None:
    answer = await api.post(LABS, json=lab(count=6), headers=auth())  # alice's plan holds 5 VMs
    assert (answer.status_code, answer.json()["message"]) == (400, MSG_TOTAL_LIMIT)
    assert answer.json()["data"] is None
    assert created_vms(pve) == [] and vm_records(engine) == [] and reservations(engine) == []
    # No creation was started (this test's task queue: the dev server is shared by the session's tests).
    query = f"WorkflowType = 'CreateFromBoxWorkflow' AND TaskQueue = '{settings.temporal_task_queue}'"
    assert [run async for run in temporal.list_workflows(query)] == []
    # Five fit.
    answer = await api.post(LABS, json=lab(count=5, cpuCores=1), headers=auth())
    assert answer.status_code == 200, answer.text


@pytest.fixture
def pve3_failing(pve: Any) -> None:
    """A third node, pve3, on which configuring any VM fails for good."""
    pve.add_node("pve3")
    fail_configure(pve, "pve3", range(100, 130))


@pytest.mark.usefixtures("teacher", "pve3_failing", "worker")
async def test_a_lab_with_a_target_failing_ends_with_every_vm_made_elsewhere(
    api: httpx.AsyncClient, pve: Any, engine: Engine
) -> None:
    admitted = await post_lab(api, count=6, targets=["pve2", "pve3"])
    assert Counter(vm["node"] for vm in admitted["vms"]) == {"pve2": 3, "pve3": 3}

    state = await lab_end(api, admitted["task_id"])
    assert (state["status"], state["result_message"]) == ("succeeded", "Created 6 of 6 VMs")
    retried = [vm for vm in state["vms"] if vm["task_id"].endswith("-retry")]
    assert len(retried) == 3
    assert {vm["node"] for vm in state["vms"]} == {"pve2"}
    on_pve = owned_vms(pve)
    assert len(on_pve) == 6 and {vm.node for vm in on_pve.values()} == {"pve2"}
    for vm in state["vms"]:
        assert is_owned_by(str(on_pve[int(vm["vmid"])].config.get("description", "")), vm["task_id"])
    assert len(vm_records(engine)) == 6 and reservations(engine, HELD) == []


@pytest.mark.fakepve(time_scale=1)
@pytest.mark.usefixtures("teacher", "pve3_failing", "worker")
async def test_a_vm_tried_again_shows_its_new_vmid_while_its_creation_runs(
    api: httpx.AsyncClient, pve: Any, engine: Engine
) -> None:
    # Every request to pve2 takes a second: the creation tried again there runs on for about 2 s after its
    # admission (its configuration's reads and writes), long enough to be seen running with its VMID.
    pve.slow_network(1.0, node="pve2")
    task_id = (await post_lab(api, count=2, targets=["pve2", "pve3"]))["task_id"]

    deadline = asyncio.get_running_loop().time() + 60
    while True:
        vms = (await lab_state(api, task_id))["vms"]
        seen = next((vm for vm in vms if vm["task_id"].endswith("-retry") and vm["vmid"]), None)
        if seen is not None:
            break
        assert asyncio.get_running_loop().time() < deadline, f"no VM tried again with a VMID: {vms}"
        await asyncio.sleep(0.2)
    assert seen["status"] == "running"  # known while its creation runs, not only once it has ended
    own = await lab_state(api, seen["task_id"])  # the creation's own task says the same VMID
    assert (own["status"], own["vmid"]) == ("running", seen["vmid"])

    state = await lab_end(api, task_id)
    assert (state["status"], state["result_message"]) == ("succeeded", "Created 2 of 2 VMs")
    retried = next(vm for vm in state["vms"] if vm["task_id"] == seen["task_id"])
    assert (retried["vmid"], retried["node"]) == (seen["vmid"], "pve2")
    assert int(seen["vmid"]) in owned_vms(pve) and reservations(engine, HELD) == []


@pytest.mark.usefixtures("teacher", "worker")
async def test_a_lab_with_permanent_failures_keeps_what_it_made(
    api: httpx.AsyncClient, pve: Any, engine: Engine
) -> None:
    # One target: the VM that fails is tried again there, and fails again (whichever VMID it gets).
    fail_configure(pve, "pve2", range(101, 130, 2))
    admitted = await post_lab(api, count=4, targets=["pve2"])
    assert [vm["vmid"] for vm in admitted["vms"]] == ["100", "101", "102", "103"]

    state = await lab_end(api, admitted["task_id"])
    assert (state["status"], state["result_code"], state["result_message"]) == ("failed", 500, "Created 2 of 4 VMs")
    statuses = {vm["vm_name"]: vm["status"] for vm in state["vms"]}
    assert statuses == {"class-01": "succeeded", "class-02": "failed", "class-03": "succeeded", "class-04": "failed"}
    # The two made are kept, whole; nothing half made is left, and no quota is held.
    assert sorted(owned_vms(pve)) == [100, 102]
    assert sorted(r.vmid for r in vm_records(engine)) == [100, 102]
    assert reservations(engine, HELD) == []


@pytest.mark.usefixtures("teacher", "worker")
async def test_a_lab_is_deleted(api: httpx.AsyncClient, pve: Any, engine: Engine, temporal: Client) -> None:
    answer = await api.post(LABS, json=lab(count=3), headers=auth())
    task_id = answer.json()["data"]["task_id"]
    early = await api.delete(f"{LABS}/{task_id}", headers=auth())
    if early.status_code == 409:  # asked while it ran
        assert early.json()["message"] == "Lab is still being created"
    await lab_end(api, task_id)
    assert len(owned_vms(pve)) == 3

    deleted = await api.delete(f"{LABS}/{task_id}", headers=auth())
    assert deleted.status_code == 200, deleted.text
    assert deleted.json()["message"] == "Lab deletion started"
    deletions = deleted.json()["data"]["deletions"]
    assert deleted.json()["data"]["task_id"] == task_id and len(deletions) == 3
    for deletion in deletions:
        handle = temporal.get_workflow_handle(deletion["task_id"])
        await asyncio.wait_for(handle.result(), 60)
    assert owned_vms(pve) == {}
    assert all(record.deleted_at is not None for record in vm_records(engine))
    # Someone else's lab, and a task that is no lab, are no lab of the caller's.
    assert (await api.delete(f"{LABS}/{task_id}", headers=auth(BOB))).status_code == 404
    assert (await api.delete(f"{LABS}/{deletions[0]['task_id']}", headers=auth())).status_code == 404


@pytest.mark.usefixtures("teacher", "one_clone_per_node", "worker")
@pytest.mark.fakepve(time_scale=1)
async def test_a_lab_cancelled_midway_keeps_the_vms_made_and_cleans_up_the_rest(
    api: httpx.AsyncClient, pve: Any, engine: Engine, temporal: Client
) -> None:
    pve.add_ceph_storage("ceph")
    pve.ceph_slow(1)  # each clone takes 1 s, one at a time
    task_id = (await post_lab(api, count=5, storage="ceph"))["task_id"]
    await until(lambda: len(vm_records(engine)) >= 2, timeout=60)
    cancelled = await api.post(f"{TASKS}/{task_id}/cancel", headers=auth())
    assert cancelled.status_code == 200, cancelled.text

    state = await lab_end(api, task_id)
    assert state["status"] == "cancelled"
    made = [vm for vm in state["vms"] if vm["status"] == "succeeded"]
    assert 2 <= len(made) < 5
    assert {vm["status"] for vm in state["vms"]} <= {"succeeded", "cancelled"}
    description = await temporal.get_workflow_handle(task_id).describe()
    assert description.status == WorkflowExecutionStatus.CANCELED
    # The VMs made are kept; the creations cancelled cleaned up after themselves.
    assert sorted(owned_vms(pve)) == sorted(int(vm["vmid"]) for vm in made)
    assert len([r for r in vm_records(engine) if r.deleted_at is None]) == len(made)
    assert reservations(engine, HELD) == []


@pytest.mark.usefixtures("teacher", "worker")
async def test_a_lab_of_100_keeps_a_bounded_history(api: httpx.AsyncClient, pve: Any, temporal: Client) -> None:
    admitted = await post_lab(api, count=100, targets=["pve1", "pve2"])
    names = [vm["vm_name"] for vm in admitted["vms"]]
    assert names[0] == "class-001" and names[-1] == "class-100"  # three digits for every VM when there are 100
    task_id = admitted["task_id"]
    state = await lab_end(api, task_id, timeout=240)
    assert (state["status"], state["result_message"]) == ("succeeded", "Created 100 of 100 VMs")
    assert len(created_vms(pve)) == 100
    history = await temporal.get_workflow_handle(task_id).fetch_history()
    size = len(history.to_json())
    print(f"lab of 100: {len(history.events)} events, {size / 1024:.0f} KiB of history")
    # Children, not activities per VM, and each memo update only the VMs that changed: about 6 events and 8 KiB
    # per VM (619 events, 753 KiB measured), far within Temporal's limits (50,000 events, 50 MB), without
    # continue-as-new. The memo of every VM at each update came to 2 MB, growing with the square of the VMs.
    assert len(history.events) < 1000
    assert size < 1536 * 1024


@pytest.mark.usefixtures("teacher", "worker")
async def test_a_lab_runs_as_a_child_workflow(temporal: Client, settings: Settings, pve: Any) -> None:
    parent_queue = f"course-{uuid.uuid4().hex[:8]}"
    course = LabInput(
        username="alice", box_id=BOX, name="course", count=2, cpu_cores=1, memory_mb=512, disk_gb=10, targets=["pve2"]
    )
    async with Worker(temporal, task_queue=parent_queue, workflows=[CourseWorkflow]):
        made = await temporal.execute_workflow(
            CourseWorkflow.run,
            args=[course, settings.temporal_task_queue],
            id=f"course-{uuid.uuid4().hex[:8]}",
            task_queue=parent_queue,
        )
        refused = await temporal.execute_workflow(
            CourseWorkflow.run,
            args=[dataclasses.replace(course, box_id="missing"), settings.temporal_task_queue],
            id=f"course-{uuid.uuid4().hex[:8]}",
            task_queue=parent_queue,
        )
        # What the API refuses before any run, a parent's lab refuses in its admission.
        misnamed = await temporal.execute_workflow(
            CourseWorkflow.run,
            args=[dataclasses.replace(course, name="bad_name"), settings.temporal_task_queue],
            id=f"course-{uuid.uuid4().hex[:8]}",
            task_queue=parent_queue,
        )
    assert made == "made 2: course-01=100@pve2, course-02=101@pve2"
    assert refused == f"failed: {MSG_BOX_NOT_FOUND}"
    assert misnamed == f"failed: {MSG_INVALID_NAME}"
    assert sorted(vm.name for vm in created_vms(pve)) == ["course-01", "course-02"]


@pytest.mark.usefixtures("teacher", "worker")
async def test_a_lab_repeated_under_its_idempotency_key_is_made_once(api: httpx.AsyncClient, pve: Any) -> None:
    headers = {**auth(), "Idempotency-Key": "course-101 lab"}
    first = await api.post(LABS, json=lab(count=3), headers=headers)
    again = await api.post(LABS, json=lab(count=3), headers=headers)
    assert first.status_code == again.status_code == 200, (first.text, again.text)
    assert again.json()["data"] == first.json()["data"]
    await lab_end(api, first.json()["data"]["task_id"])
    later = await api.post(LABS, json=lab(count=3), headers=headers)  # after the lab has ended
    assert (later.status_code, later.json()["data"]) == (200, first.json()["data"])
    assert len(created_vms(pve)) == 3
    other = await api.post(LABS, json=lab(count=4), headers=headers)
    assert (other.status_code, other.json()["message"]) == (422, MSG_KEY_REUSED)
    # The key names this lab: a VM asked for under it is another request.
    single = await api.post(
        "/api/v1/vm/manage/createFromBoxTemplate", json=body(cpuCores=1, memorySize=512, diskSize=10), headers=headers
    )
    assert (single.status_code, single.json()["message"]) == (422, MSG_KEY_REUSED)
    assert len(created_vms(pve)) == 3


@pytest.mark.usefixtures("teacher", "worker")
async def test_bad_lab_requests_are_refused_and_leave_nothing(api: httpx.AsyncClient, pve: Any, engine: Engine) -> None:
    cases = [
        (lab(count=0), 400),
        (lab(count=101), 400),
        (lab(targets=[]), 400),
        (lab(name="bad_name"), 400),
        (lab(name="x" * 126), 400),  # x...x-12 is past PVE's 128 characters
        (lab(colour="blue"), 400),
        (lab(targets=["pve9"]), 400),
        (lab(box_id="missing"), 404),
    ]
    for request, status in cases:
        answer = await api.post(LABS, json=request, headers=auth())
        assert answer.status_code == status, (request, answer.text)
        assert answer.json()["data"] is None
    assert (await api.post(LABS, json=lab(targets=["pve9"]), headers=auth())).json()["message"] == (
        "Unknown target node 'pve9'"
    )
    # A bad item of a list is named by the list and its place, as the seed names a bad field.
    for targets, message in [
        (["pve1", 5], "'targets' item 1 must be a non-empty string"),
        (["pve1\n"], "'targets' item 0 must not contain control characters"),
        (["pve1", "pve2", "pve1"], "'targets' names 'pve1' twice"),
        ([], "'targets' must have at least 1 item"),
    ]:
        answer = await api.post(LABS, json=lab(targets=targets), headers=auth())
        assert (answer.status_code, answer.json()["message"]) == (400, f"Invalid request body: {message}")
    assert created_vms(pve) == [] and reservations(engine) == []


@pytest.mark.usefixtures("teacher", "worker")
async def test_without_targets_a_lab_goes_to_the_nodes_that_can_take_its_clones(
    api: httpx.AsyncClient, pve: Any
) -> None:
    # A storage local to each node: only the template's node (pve1) can clone onto it.
    pve.storages["local"] = {
        "type": "dir",
        "active": 1,
        "content": "images,rootdir",
        "shared": 0,
        "path": "/var/lib/vz",
    }
    admitted = await post_lab(api, count=3, storage="local")
    assert {vm["node"] for vm in admitted["vms"]} == {"pve1"}
    # Asked for by name, a node that cannot is refused with the reason, as for one VM.
    refused = await api.post(LABS, json=lab(count=3, storage="local", targets=["pve1", "pve2"]), headers=auth())
    assert refused.status_code == 400 and "is not shared" in refused.json()["message"]
    pve.set_node_offline("pve2")
    offline = await api.post(LABS, json=lab(count=2, targets=["pve2"]), headers=auth())
    assert offline.status_code == 503 and "offline" in offline.json()["message"], offline.text


@pytest.mark.usefixtures("teacher", "worker")
async def test_a_failed_lab_reset_by_an_operator_makes_its_vms_once(
    api: httpx.AsyncClient, pve: Any, engine: Engine, temporal: Client, settings: Settings
) -> None:
    from tests.test_operators import reset

    settings.admission_timeout_seconds = 2  # the lab's deadline for its admission: long past when it is reset
    pve.fail("POST", "/clone", error="permission_denied")  # every clone refused, the retries' too
    posted = asyncio.get_running_loop().time()
    task_id = (await post_lab(api, count=2, targets=["pve2"]))["task_id"]
    state = await lab_end(api, task_id)
    assert (state["status"], state["result_message"]) == ("failed", "Created 0 of 2 VMs")
    assert created_vms(pve) == [] and reservations(engine, HELD) == []

    # The operator clears the cause and resets the lab (Web UI, or `temporal workflow reset`).
    await asyncio.sleep(max(0.0, posted + 2.5 - asyncio.get_running_loop().time()))
    pve.failures.clear()
    reset(temporal, task_id)

    await until(lambda: len(created_vms(pve)) == 2, timeout=60)
    state = await lab_end(api, task_id)
    assert (state["status"], state["result_message"]) == ("succeeded", "Created 2 of 2 VMs")
    on_pve = owned_vms(pve)
    assert len(on_pve) == 2
    for vm in state["vms"]:
        assert vm["status"] == "succeeded"
        assert is_owned_by(str(on_pve[int(vm["vmid"])].config.get("description", "")), vm["task_id"])
    assert sorted(r.vmid for r in vm_records(engine)) == sorted(on_pve)
    assert reservations(engine, HELD) == []


@pytest.mark.fakepve(time_scale=1)
@pytest.mark.usefixtures("teacher", "worker")
async def test_a_running_lab_reset_by_an_operator_makes_its_vms_once(
    api: httpx.AsyncClient, pve: Any, engine: Engine, temporal: Client
) -> None:
    from tests.test_operators import reset

    pve.slow_network(0.3, node="pve2")  # its creations are under way when the operator resets it
    task_id = (await post_lab(api, count=2, targets=["pve2"]))["task_id"]
    await until(lambda: len(created_vms(pve)) >= 1, timeout=60)
    reset(temporal, task_id)

    state = await lab_end(api, task_id, timeout=120)
    on_pve = owned_vms(pve)
    assert (state["status"], state["result_message"]) == ("succeeded", "Created 2 of 2 VMs")
    assert len(on_pve) == 2
    for vm in state["vms"]:
        assert is_owned_by(str(on_pve[int(vm["vmid"])].config.get("description", "")), vm["task_id"])
    assert sorted(r.vmid for r in vm_records(engine)) == sorted(on_pve)
    assert reservations(engine, HELD) == []


@pytest.mark.usefixtures("teacher", "worker")
async def test_a_lab_that_made_some_vms_reset_keeps_them_and_makes_the_rest(
    api: httpx.AsyncClient, pve: Any, engine: Engine, temporal: Client
) -> None:
    from tests.test_operators import reset

    fail_configure(pve, "pve2", range(101, 102))  # class-02 fails, tried again there, and fails again
    task_id = (await post_lab(api, count=2, targets=["pve2"]))["task_id"]
    state = await lab_end(api, task_id)
    assert (state["status"], state["result_message"]) == ("failed", "Created 1 of 2 VMs")
    kept = owned_vms(pve)
    assert sorted(kept) == [100]

    pve.failures.clear()
    reset(temporal, task_id)
    state = await lab_end(api, task_id)
    assert (state["status"], state["result_message"]) == ("succeeded", "Created 2 of 2 VMs")
    first = state["vms"][0]
    # The VM made before the reset is the lab's still: the same creation and VM, not made again.
    assert (first["task_id"], first["vmid"]) == (f"{task_id}-01", "100")
    on_pve = owned_vms(pve)
    assert len(on_pve) == 2 and on_pve[100] is kept[100]
    for vm in state["vms"]:
        assert is_owned_by(str(on_pve[int(vm["vmid"])].config.get("description", "")), vm["task_id"])
    assert sorted(r.vmid for r in vm_records(engine)) == sorted(on_pve)
    assert reservations(engine, HELD) == []


@pytest.mark.usefixtures("worker")
async def test_a_lab_reset_at_its_plans_limit_counts_a_vm_its_retry_made_once(
    api: httpx.AsyncClient, pve: Any, engine: Engine, temporal: Client
) -> None:
    from tests.test_operators import reset

    # alice's plan holds exactly the lab's 2 VMs.
    pair = {**CLASS_PLAN, "id": "pair", "total": {"cores": 400, "memory_mb": 409600, "disk_gb": 10000, "vms": 2}}
    users = [{**u, "plan": "pair"} if u["username"] == "alice" else u for u in ADMIN_DATA["users"]]
    load_admin_data(engine, {**ADMIN_DATA, "plans": [*ADMIN_DATA["plans"], pair], "users": users})
    # class-02's first creation fails once; tried again, it is made (its task id `...-02-retry`).
    pve.fail("PUT", "/nodes/pve2/qemu/101/config", 400, "parameter verification failed", times=1)
    task_id = (await post_lab(api, count=2, targets=["pve2"]))["task_id"]
    state = await lab_end(api, task_id)
    assert (state["status"], state["result_message"]) == ("succeeded", "Created 2 of 2 VMs")
    assert state["vms"][1]["task_id"] == f"{task_id}-02-retry"
    made = owned_vms(pve)

    reset(temporal, task_id)
    state = await lab_end(api, task_id)
    # Admitted anew within the plan (the VM made under the retry's id counts once), and nothing made again.
    assert (state["status"], state["result_message"]) == ("succeeded", "Created 2 of 2 VMs")
    assert [vm["task_id"] for vm in state["vms"]] == [f"{task_id}-01", f"{task_id}-02-retry"]
    assert owned_vms(pve) == made and len(vm_records(engine)) == 2
    assert reservations(engine, HELD) == []


@pytest.fixture
async def two_activity_slots(
    temporal: Client, settings: Settings, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Worker]:
    """A worker that runs 2 activities at once: a lab of 5 waiting on its creations stands for the 64 of a real
    worker and a lab of 100."""
    monkeypatch.setattr(worker_module, "ACTIVITY_THREADS", 2)
    with ThreadPoolExecutor(max_workers=2) as executor:
        worker = worker_module.build_worker(
            temporal, settings.temporal_task_queue, engine, PveClient(settings), settings, executor
        )
        async with worker:
            yield worker


@pytest.mark.fakepve(time_scale=1)
@pytest.mark.usefixtures("teacher", "two_activity_slots")
async def test_a_lab_reset_while_more_vms_run_than_the_worker_has_activity_slots_ends(
    api: httpx.AsyncClient, pve: Any, engine: Engine, temporal: Client
) -> None:
    from tests.test_operators import reset

    pve.slow_network(0.3, node="pve2")
    task_id = (await post_lab(api, count=5, targets=["pve2"]))["task_id"]
    await until(lambda: len(created_vms(pve)) >= 1, timeout=60)
    reset(temporal, task_id)
    # The reset run waits for the creations it had begun without holding the slots they need to go on.
    state = await lab_end(api, task_id, timeout=90)
    assert (state["status"], state["result_message"]) == ("succeeded", "Created 5 of 5 VMs")
    on_pve = owned_vms(pve)
    assert len(on_pve) == 5
    assert sorted(r.vmid for r in vm_records(engine)) == sorted(on_pve)
    assert reservations(engine, HELD) == []
