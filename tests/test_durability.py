"""A worker SIGKILLed in the middle of a run: another worker finishes it, with exactly one VM."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine
from temporalio.client import Client

from db.models import COMMITTED
from dev.stack import Stack, settings_env
from settings import Settings
from tests.conftest import created_vms, reservations, result_of, vm_records
from tests.factories import auth, body
from tests.waiting import until


@pytest.mark.slow
@pytest.mark.fakepve(time_scale=1)
async def test_worker_killed_during_the_clone_and_another_finishes_the_run(
    api: httpx.AsyncClient, temporal: Client, settings: Settings, pve: Any, engine: Engine, tmp_path: Path
) -> None:
    pve.add_ceph_storage("ceph")
    pve.ceph_slow(4)  # the clone takes 4 s: long enough to kill the worker in the middle of it
    processes = Stack(tmp_path)
    env = settings_env(settings)
    try:
        first = processes.worker(env, "worker1")
        response = await api.post(CREATE, json=body(storage="ceph"), headers=auth())
        assert response.status_code == 200, response.text
        task_id = response.json()["data"]["task_id"]
        await until(lambda: any(vm.lock == "clone" for vm in created_vms(pve)))
        first.kill()

        processes.worker(env, "worker2")
        result = await result_of(temporal, task_id, timeout=120)
    finally:
        processes.stop()

    assert result.vmid == 100
    [vm] = created_vms(pve)
    assert (vm.vmid, vm.node, vm.lock, vm.config["cores"]) == (100, "pve2", None, "2")
    clones = [r for r in pve.requests if r[0] == "POST" and r[1].endswith("/clone")]
    assert len(clones) == 1
    assert [r.state for r in reservations(engine)] == [COMMITTED]
    assert len(vm_records(engine)) == 1


CREATE = "/api/v1/vm/manage/createFromBoxTemplate"
