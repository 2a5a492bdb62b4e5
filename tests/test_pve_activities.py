"""PVE activities alone (ActivityEnvironment), for PVE behaviour the end-to-end tests cannot produce with the
fake (on real PVE a VM being cloned has no description yet, only the clone lock), and for moments they cannot
hit (a VM replaced between the activity's look and its write)."""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import pytest
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.heartbeats import Heartbeats
from activities.pve import PveActivities
from payloads import (
    VM_NOT_OURS,
    VMID_TAKEN,
    BoxOptions,
    CloneInput,
    CloudInit,
    ConfigureInput,
    Network,
    TemplateRef,
    VmRef,
)
from pve.agent import addresses
from pve.client import PveClient, PveUnavailable
from pve.ownership import vm_description
from settings import Settings

TASK = "clone-box-1-abc"


@pytest.fixture
def activities(settings: Settings) -> PveActivities:
    return PveActivities(PveClient(settings), "NFS")


def clone_in_progress(pve: Any, vmid: int = 100) -> Any:
    vm = pve.add_vm(vmid, f"Copy-of-VM-{vmid}", node="pve1", config={"lock": "clone"})
    vm.lock = "clone"
    vm.config.pop("name", None)
    return vm


def test_cleanup_waits_for_a_clone_in_progress_instead_of_leaving_it(pve: Any, activities: PveActivities) -> None:
    clone_in_progress(pve)
    with pytest.raises(ApplicationError) as still:
        ActivityEnvironment().run(activities.destroy_vm, VmRef(task_id=TASK, node="pve2", vmid=100))
    assert still.value.type == "StillRunning"
    assert pve.vm(100) is not None


def test_a_retried_clone_does_not_take_a_clone_in_progress_for_a_stranger(pve: Any, activities: PveActivities) -> None:
    clone_in_progress(pve)
    with pytest.raises(PveUnavailable):  # retried until the clone ends and its owner shows
        activities._adoptable(TASK, 100)
    # Once it has ended: ours is adopted, a stranger's is a VMID taken.
    vm = pve.vm(100)
    vm.lock = None
    vm.config.pop("lock")
    vm.config["description"] = vm_description(TASK)
    assert activities._adoptable(TASK, 100) is True
    with pytest.raises(ApplicationError) as taken:  # a task whose id merely extends ours is someone else
        activities._adoptable(TASK + "2", 100)
    assert taken.value.type == VMID_TAKEN


def test_a_container_under_the_vmid_is_a_vmid_taken(pve: Any, activities: PveActivities) -> None:
    pve.add_ct(100, "ct", node="pve1")
    req = CloneInput(TASK, TemplateRef("pve1", 9000), 100, "vm", "pve2", "NFS")
    with pytest.raises(ApplicationError) as taken:
        ActivityEnvironment().run(activities.start_clone, req)
    assert taken.value.type == VMID_TAKEN
    # And a cleanup never touches it.
    ActivityEnvironment().run(activities.destroy_vm, VmRef(task_id=TASK, node="pve1", vmid=100))
    assert pve.guest(100) is not None


# ------------------------------------------------------------ configuration: this task's VM only

STRANGER = "clone-other-1-abc"
# Cores 2, memory 2048, the boot disk grown from 10 to 20 GB.
CONFIGURE = ConfigureInput(TASK, "pve2", 100, 2, 2048, "scsi0", 20, 10)


def vm_of(pve: Any, task_id: str) -> Any:
    return pve.add_vm(
        100,
        "vm",
        node="pve2",
        config={"description": vm_description(task_id), "scsi0": "NFS:100/vm-100-disk-0,size=10G"},
    )


def not_ours(activities: PveActivities) -> ApplicationError:
    with pytest.raises(ApplicationError) as refused:
        ActivityEnvironment().run(activities.configure_vm, CONFIGURE)
    assert (refused.value.type, refused.value.non_retryable) == (VM_NOT_OURS, True)
    return refused.value


def writes(pve: Any) -> list[str]:
    return [path.rsplit("/", 1)[1] for method, path, _body in pve.requests if method == "PUT"]


def test_configuration_writes_with_the_digest_of_the_config_it_found_its_marker_in(
    pve: Any, activities: PveActivities
) -> None:
    vm = vm_of(pve, TASK)
    digest = vm.digest()
    ActivityEnvironment().run(activities.configure_vm, CONFIGURE)
    assert (vm.config["cores"], vm.config["memory"], vm.config["tags"]) == ("2", "2048", "pve-boxes")
    [config_write, resize] = [body for method, _path, body in pve.requests if method == "PUT"]
    assert f"digest={digest}" in str(config_write)
    assert f"digest={vm.digest()}" in str(resize)  # the config as the first write left it


def test_configuration_leaves_a_vm_without_the_tasks_marker_alone(pve: Any, activities: PveActivities) -> None:
    stranger = vm_of(pve, STRANGER)
    assert "is not task" in not_ours(activities).message
    # Notes that merely quote the marker name nobody.
    stranger.config["description"] = f"copied from pve-boxes task {TASK}"
    not_ours(activities)
    assert writes(pve) == []
    pve.vms.remove(stranger)
    assert "is gone" in not_ours(activities).message


def test_a_vm_replaced_between_the_look_and_the_write_is_not_written(
    pve: Any, activities: PveActivities, monkeypatch: pytest.MonkeyPatch
) -> None:
    vm = vm_of(pve, TASK)
    look = activities.pve.get_expecting  # pve.vms.vm_config's read, which a VM gone may answer

    def replaced_after_the_look(path: str, expected: Any, **params: Any) -> Any:
        answer = look(path, expected, **params)
        vm.config["description"] = vm_description(STRANGER)  # another creation's VM took the VMID meanwhile
        return answer

    monkeypatch.setattr(activities.pve, "get_expecting", replaced_after_the_look)
    with pytest.raises(PveUnavailable):  # PVE refused the write for its digest: retried, from a new look
        ActivityEnvironment().run(activities.configure_vm, CONFIGURE)
    assert "cores" not in vm.config
    monkeypatch.undo()
    not_ours(activities)  # the retry's look tells
    assert "cores" not in vm.config


def test_a_vm_replaced_between_the_config_write_and_the_resize_is_not_resized(
    pve: Any, activities: PveActivities, monkeypatch: pytest.MonkeyPatch
) -> None:
    vm = vm_of(pve, TASK)
    put = activities.pve.put

    def replaced_after_the_config_write(path: str, **params: Any) -> Any:
        answer = put(path, **params)
        vm.config["description"] = vm_description(STRANGER)
        return answer

    monkeypatch.setattr(activities.pve, "put", replaced_after_the_config_write)
    not_ours(activities)
    assert writes(pve) == ["config"]


def test_a_dropped_read_is_asked_again_once_and_a_dropped_write_or_a_hung_read_is_not(
    pve: Any, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.pve_timeout_seconds = 1
    client = PveClient(settings)
    client.get("version")  # logged in before the network goes bad
    # Count what the client sends (the fake does not see requests whose connection it drops).
    adapter = client._current()._store["session"].get_adapter(f"https://{pve.host}:{pve.port}/")
    sent: list[str] = []
    send = adapter.send

    def counting_send(request: Any, **kwargs: Any) -> Any:
        sent.append(f"{request.method} {urlsplit(request.url).path.removeprefix('/api2/json/')}")
        return send(request, **kwargs)

    monkeypatch.setattr(adapter, "send", counting_send)

    pve.flaky_network(drop_rate=1.0)
    with pytest.raises(PveUnavailable):
        client.get("cluster/resources")
    with pytest.raises(PveUnavailable):
        client.post("nodes/pve1/qemu/9000/clone", newid=100)
    assert sent == ["GET cluster/resources", "GET cluster/resources", "POST nodes/pve1/qemu/9000/clone"]

    sent.clear()
    pve.flaky_network(hang_rate=1.0, hang_secs=2)
    with pytest.raises(PveUnavailable):
        client.get("cluster/resources")
    assert sent == ["GET cluster/resources"]  # PVE is slow, not gone: no second wait at once
    pve.flaky_network()


def test_a_blocked_pve_call_is_heartbeated_by_the_workers_helper_thread(
    activities: PveActivities, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The activity is kept alive while PVE is slow, and starts no thread of its own: a thread started from an
    activity's thread can be killed at birth by the activity's cancellation, and Thread.start() then hangs
    (it did, at a worker's shutdown in the test suite)."""
    activities._heartbeats = Heartbeats(every=0.05)
    get = activities.pve.get

    def slow_get(path: str, **params: Any) -> Any:
        time.sleep(0.4)
        return get(path, **params)

    monkeypatch.setattr(activities.pve, "get", slow_get)
    starters: list[threading.Thread] = []
    start = threading.Thread.start

    def recording_start(thread: threading.Thread) -> None:
        starters.append(threading.current_thread())
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", recording_start)
    beats: list[Any] = []
    env = ActivityEnvironment()
    env.on_heartbeat = lambda *details: beats.append(details)
    env.run(activities.destroy_vm, VmRef(task_id=TASK, node="pve2", vmid=100))  # no such VM: one slow look
    assert len(beats) >= 3
    assert threading.current_thread() not in starters  # ActivityEnvironment runs the activity in this thread


def test_one_slow_heartbeat_does_not_hold_up_the_others() -> None:
    """A heartbeat waits for the worker's event loop to take it. One that waits long must not delay the
    heartbeats of the other activities in flight past their heartbeat timeout."""
    heartbeats = Heartbeats(every=0.1)
    beats: dict[str, int] = {"slow": 0, "quick": 0}

    def blocked_activity(name: str, heartbeat_takes: float) -> None:
        env = ActivityEnvironment()

        def on_heartbeat(*_details: Any) -> None:
            beats[name] += 1
            time.sleep(heartbeat_takes)

        env.on_heartbeat = on_heartbeat

        def blocked_in_pve() -> None:
            with heartbeats.during():
                time.sleep(1.0)

        env.run(blocked_in_pve)

    both = [
        threading.Thread(target=blocked_activity, args=("slow", 0.8)),
        threading.Thread(target=blocked_activity, args=("quick", 0.0)),
    ]
    for thread in both:
        thread.start()
    for thread in both:
        thread.join()
    assert beats["quick"] >= 5  # about 9; one after another, the slow one would have let through 2
    assert 1 <= beats["slow"] <= 2  # and a heartbeat still under way is not sent again


# ------------------------------------------------------------------------------ a VM ready to use


def configured(pve: Any, activities: PveActivities, config: dict[str, str], **changes: Any) -> Any:
    """The VM with `config` (and this task's marker) once configure_vm wrote a ready box's options to it."""
    vm = pve.add_vm(100, "vm", node="pve2", config={"description": vm_description(TASK), **config})
    box = BoxOptions(cloud_init=CloudInit(user="ubuntu"), tags=["web"], network=Network(vlan=7))
    ActivityEnvironment().run(activities.configure_vm, dataclasses.replace(CONFIGURE, box=box, **changes))
    return vm


def test_a_vm_with_a_cloud_init_drive_gets_no_second_one_and_keeps_its_own_tags(
    pve: Any, activities: PveActivities
) -> None:
    drive = "NFS:100/vm-100-cloudinit.qcow2,media=cdrom"
    vm = configured(pve, activities, {"ide2": drive, "tags": "Web;team-a", "net0": "e1000=BC:24:11:00:00:09,tag=3"})
    assert vm.config["ide2"] == drive
    assert not [key for key in vm.config if key.startswith(("ide", "scsi", "sata")) and key != "ide2"]
    assert vm.config["tags"] == "pve-boxes;team-a;Web"  # `web` is the template's `Web`: PVE compares without case
    assert vm.config["net0"] == "e1000=BC:24:11:00:00:09,tag=7"  # only the VLAN asked for: the bridge as it was
    assert [method for method, path, _ in pve.requests if path.endswith("/config") and method != "GET"] == ["PUT"]


def test_a_cloud_init_drive_takes_the_first_free_slot_and_is_written_by_a_task(
    pve: Any, activities: PveActivities
) -> None:
    vm = configured(pve, activities, {"ide2": "none,media=cdrom"}, storage="local-lvm")
    assert vm.config["ide0"] == "local-lvm:cloudinit"
    # A write that allocates a volume goes through PVE's asynchronous form, whose task is awaited.
    assert [method for method, path, _ in pve.requests if path.endswith("/config") and method != "GET"] == ["POST"]


def test_the_guest_agents_addresses_leave_out_loopback_and_link_local_and_put_ipv4_first() -> None:
    interfaces: list[dict[str, Any]] = [
        {"name": "lo", "ip-addresses": [{"ip-address": "127.0.0.1"}, {"ip-address": "::1"}]},
        {
            "name": "eth0",
            "ip-addresses": [
                {"ip-address": "fe80::be24:11ff:fe00:1%eth0"},
                {"ip-address": "2001:db8::10"},
                {"ip-address": "169.254.3.4"},
                {"ip-address": "192.0.2.10"},
            ],
        },
        {"name": "eth1", "ip-addresses": [{"ip-address": "198.51.100.7"}, {"ip-address": "192.0.2.10"}]},
        {"name": "eth2"},
    ]
    assert addresses(interfaces) == ["192.0.2.10", "198.51.100.7", "2001:db8::10"]
