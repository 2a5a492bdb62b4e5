"""Every PVE call the service makes. Activities are idempotent for their task id: Temporal may run one more
than once (a retry, a worker crash, a reset from the Web UI) and the world must end up the same."""

from __future__ import annotations

import contextvars
import itertools
import logging
import math
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory

from activities.pve_client import TRANSIENT_MESSAGES, PveClient, PveError, PveUnavailable
from payloads import (
    MSG_CLONE_FAILED,
    MSG_TEMPLATE_NOT_FOUND,
    PVE_TASK_FAILED,
    PVE_TASK_FAILED_TRANSIENT,
    SERVICE_TAG,
    VMID_TAKEN,
    CloneInput,
    CloneStarted,
    ConfigureInput,
    Failure,
    InspectInput,
    PveTaskRef,
    TemplateFacts,
    VmRef,
    vm_description,
)

FIRST_VMID = 100
LAST_VMID = 999_999_999
MAX_FREE_RANGES = 256  # a fragmented cluster still offers thousands of free VMIDs in these
DISK_KEY = re.compile(r"^(scsi|virtio|sata|ide)\d+$")
SIZE = re.compile(r"(?:^|,)size=(\d+(?:\.\d+)?)([KMGT]?)(?:,|$)")
GIB_PER_UNIT = {"K": 1 / 1024**2, "M": 1 / 1024, "G": 1.0, "T": 1024.0, "": 1 / 1024**3}
# Waiting for PVE tasks. A clone is watched inside the activity that starts it for its first seconds (most
# clones of small templates end by then); after that, each retry of await_task is one look, and the retry
# policy spaces the looks out, so that a long clone holds no worker slot while it runs.
CLONE_INLINE_WAIT = 3.0
EARLY_LOOK = 0.05  # a first look at once: most short tasks have ended by then
POLL_FIRST = 0.25  # the next look, 0.25 s after the task started, as a script polling every 0.25 s would
POLL_GROWTH = 1.5
POLL_MAX_INLINE = 1.0
# Short tasks (config, resize, destroy) are awaited inside their activity, for this long at most.
SHORT_TASK_WAIT = 60.0
# While an activity's thread is blocked in a PVE call, a helper thread heartbeats this often, so that a worker
# that dies is noticed within the workflow's short heartbeat timeout rather than after the call's timeout.
HEARTBEAT_EVERY = 2.0
HEARTBEAT_SENDERS = 8  # heartbeats waiting for the worker's loop at once
log = logging.getLogger(__name__)
# A template's boot disk key, cached per worker: templates do not change their disk layout in passing.
TEMPLATE_DISK_TTL = 300.0


def is_transient_task_error(exit_status: str) -> bool:
    """A task that failed on a lock another task held (`can't lock file ... - got timeout`) or on a cluster
    hiccup may succeed when started again."""
    return bool(TRANSIENT_MESSAGES.search(exit_status))


@contextmanager
def task_failures_final() -> Iterator[None]:
    """A PVE task that ended in error ends the activity; the error's type says if starting over may help."""
    try:
        yield
    except PveTaskFailed as exc:
        raise ApplicationError(
            f"PVE task failed: {exc}",
            type=PVE_TASK_FAILED_TRANSIENT if is_transient_task_error(str(exc)) else PVE_TASK_FAILED,
            non_retryable=True,
        ) from exc


class Heartbeats:
    """Heartbeats the activities that are blocked in a PVE call, every `every` seconds, from one helper thread
    per PveActivities (one per worker).

    That thread is started with the activities, never from an activity's own thread: cancelling a threaded
    activity raises an exception in its thread (PyThreadState_SetAsyncExc), and on CPython 3.11 a thread
    being started carries its parent's id until it runs, so it can be killed before it has started, and
    Thread.start() then waits forever. A threaded activity's heartbeat waits until the worker's event loop
    takes it; the heartbeats go out side by side (a pool the helper starts), so a busy loop delays each by
    one turn of the loop, not by one turn per activity in flight."""

    def __init__(self, every: float = HEARTBEAT_EVERY):
        self._every = every
        self._beating: dict[int, contextvars.Context] = {}  # dict operations are atomic: no lock to leak
        self._next_key = itertools.count()
        threading.Thread(target=self._run, name="heartbeats", daemon=True).start()

    @contextmanager
    def during(self) -> Iterator[None]:
        key = next(self._next_key)
        self._beating[key] = contextvars.copy_context()
        try:
            yield
        finally:
            self._beating.pop(key, None)

    def _run(self) -> None:
        pool = ThreadPoolExecutor(max_workers=HEARTBEAT_SENDERS, thread_name_prefix="heartbeat")
        sending: dict[int, Future[None]] = {}
        next_round = time.monotonic()
        while True:
            next_round += self._every
            time.sleep(max(0.0, next_round - time.monotonic()))
            try:
                for key, context in list(self._beating.items()):
                    if key not in sending or sending[key].done():  # one at a time per activity
                        sending[key] = pool.submit(self._send, context)
                for key in [k for k, sent in sending.items() if sent.done() and k not in self._beating]:
                    del sending[key]
            except BaseException:  # this thread is every activity's heartbeat: it must not end
                log.exception("heartbeat round failed")

    @staticmethod
    def _send(context: contextvars.Context) -> None:
        try:
            context.run(activity.heartbeat)
        except Exception as exc:  # the worker's loop was slow to take it, or the activity just ended
            log.debug("heartbeat not sent: %r", exc)


def refuse(failure: Failure, message: str) -> ApplicationError:
    # BENIGN: a refused request is an answer, not a fault; it is not logged as a worker warning.
    return ApplicationError(message, type=failure.value, non_retryable=True, category=ApplicationErrorCategory.BENIGN)


def still_running(what: str) -> ApplicationError:
    # Retried by the caller's retry policy; BENIGN keeps these expected retries out of the worker's warnings.
    return ApplicationError(what, type="StillRunning", category=ApplicationErrorCategory.BENIGN)


@contextmanager
def final_errors_as(failure: Failure, message: str | None = None) -> Iterator[None]:
    """PVE's final errors end the step with `failure`; PveUnavailable stays retryable."""
    try:
        yield
    except PveError as exc:
        raise ApplicationError(
            message or exc.message, f"PVE {exc.status}: {exc.message}", type=failure.value, non_retryable=True
        ) from exc


def upid_node(upid: str) -> str:
    # UPID:<node>:<pid>:<pstart>:<starttime>:<type>:<id>:<user>:
    return upid.split(":")[1]


def disk_gb(drive: str) -> int:
    """Size of a drive property string (`NFS:vm-100-disk-0,size=32G`) in whole GiB, rounded up."""
    match = SIZE.search(drive)
    if not match:
        return 0
    return math.ceil(float(match.group(1)) * GIB_PER_UNIT[match.group(2)])


def boot_disk(config: dict[str, Any]) -> tuple[str, int] | None:
    """The disk the VM boots from, and its size: the first disk of `boot: order=...`, else the first disk."""
    disks = {
        key: str(value)
        for key, value in config.items()
        if DISK_KEY.match(key) and "media=cdrom" not in str(value) and str(value) != "none"
    }
    order = str(config.get("boot", ""))
    candidates = order[len("order=") :].split(";") if order.startswith("order=") else []
    if config.get("bootdisk"):
        candidates.append(str(config["bootdisk"]))
    candidates += sorted(disks)
    for key in candidates:
        if key in disks:
            return key, disk_gb(disks[key])
    return None


def free_vmid_ranges(taken: set[int]) -> list[list[int]]:
    """The gaps between the VMIDs in use, as inclusive [first, last] ranges from 100 up to PVE's maximum."""
    ranges: list[list[int]] = []
    start = FIRST_VMID
    for vmid in sorted(v for v in taken if v >= FIRST_VMID):
        if vmid > start:
            ranges.append([start, vmid - 1])
            if len(ranges) == MAX_FREE_RANGES:
                return ranges
        start = max(start, vmid + 1)
    ranges.append([start, LAST_VMID])
    return ranges


class PveActivities:
    def __init__(self, pve: PveClient, default_storage: str):
        self.pve = pve
        self.default_storage = default_storage
        self._template_disks: dict[tuple[int | str, int], tuple[float, tuple[str, int]]] = {}
        self._heartbeats = Heartbeats()

    # ------------------------------------------------------------------------- admission

    @activity.defn
    def inspect_template(self, req: InspectInput) -> TemplateFacts:
        """The template VM exists on PVE and is a template; the target node, the storage and the disk size
        can take the clone. One cluster-wide read and one config read."""
        storage = req.storage or self.default_storage
        resources = self.pve.get("cluster/resources")
        vms = [r for r in resources if r.get("type") in ("qemu", "lxc")]
        template = next((r for r in vms if r["type"] == "qemu" and int(r["vmid"]) == req.template.vmid), None)
        if template is None or not int(template.get("template") or 0):
            raise refuse(Failure.TEMPLATE_NOT_FOUND, MSG_TEMPLATE_NOT_FOUND)
        template_node = template["node"]  # where PVE has it now, even if it moved since it was registered
        nodes = {r["node"]: r.get("status") for r in resources if r.get("type") == "node"}
        if nodes.get(template_node) != "online":
            raise PveUnavailable(f"the template's node {template_node} is {nodes.get(template_node)}")
        if req.target not in nodes:
            raise refuse(Failure.INVALID_REQUEST, f"Unknown target node '{req.target}'")
        if nodes[req.target] != "online":
            raise refuse(Failure.INVALID_REQUEST, f"Target node '{req.target}' is offline")
        store = next(
            (
                r
                for r in resources
                if r.get("type") == "storage" and r.get("node") == req.target and r.get("storage") == storage
            ),
            None,
        )
        if store is None:
            raise refuse(Failure.INVALID_REQUEST, f"Storage '{storage}' is not available on node '{req.target}'")
        if "images" not in str(store.get("content", "")).split(","):
            raise refuse(Failure.INVALID_REQUEST, f"Storage '{storage}' cannot hold VM disks")
        if store.get("status") != "available":
            raise refuse(Failure.INVALID_REQUEST, f"Storage '{storage}' is not active on node '{req.target}'")
        if req.target != template_node and not int(store.get("shared") or 0):
            raise refuse(
                Failure.INVALID_REQUEST,
                f"Storage '{storage}' is not shared, so the template on '{template_node}' "
                f"cannot be cloned onto node '{req.target}'",
            )
        disk_key, template_gb = self._template_disk(template_node, req.template.vmid)
        if template.get("maxdisk"):
            # /cluster/resources gives the boot disk's size fresh on every read.
            template_gb = math.ceil(int(template["maxdisk"]) / 1024**3)
        if req.disk_gb < template_gb:
            raise refuse(
                Failure.INVALID_REQUEST,
                f"diskSize {req.disk_gb} GB is smaller than the template's disk ({template_gb} GB); "
                "PVE cannot shrink a disk",
            )
        return TemplateFacts(
            disk_key=disk_key,
            disk_gb=template_gb,
            free_ranges=free_vmid_ranges({int(r["vmid"]) for r in vms}),
            node=template_node,
            storage=storage,
        )

    # ------------------------------------------------------------------------------ clone

    @activity.defn
    def start_clone(self, req: CloneInput) -> CloneStarted:
        """Start a full clone of the template as VMID req.vmid, or adopt the one an earlier attempt started."""
        with self._heartbeats.during():
            if activity.info().attempt > 1 and self._adoptable(req.task_id, req.vmid):
                return CloneStarted(upid=None)
            params: dict[str, Any] = {
                "newid": req.vmid,
                "name": req.name,
                "full": 1,
                "storage": req.storage,
                "description": vm_description(req.task_id),
            }
            if req.target != req.template.node:
                params["target"] = req.target
            try:
                upid = str(self.pve.post(f"nodes/{req.template.node}/qemu/{req.template.vmid}/clone", **params))
            except PveError as exc:
                # An earlier attempt's request may have reached PVE although its answer did not reach us.
                if "already exists" in exc.message and self._adoptable(req.task_id, req.vmid):
                    return CloneStarted(upid=None)
                raise ApplicationError(
                    MSG_CLONE_FAILED,
                    f"PVE {exc.status}: {exc.message}",
                    type=Failure.CLONE_FAILED.value,
                    non_retryable=True,
                ) from exc
            with task_failures_final():
                finished = self._wait(upid, CLONE_INLINE_WAIT)
            return CloneStarted(upid=upid, finished=finished)

    def _adoptable(self, task_id: str, vmid: int) -> bool:
        """True if VM vmid exists and this task made it; a guest of someone else's under our VMID is final."""
        found = self._find_vm(vmid)
        if found is None:
            return False
        if found.get("type") == "qemu" and self._owned_by(task_id, found["node"], vmid):
            return True
        if found.get("type") == "qemu" and found.get("lock") == "clone":
            # While real PVE copies the first disk, the new VM's config holds nothing but the clone lock (no
            # description yet): whose clone it is can be told once it ends.
            raise PveUnavailable(f"VM {vmid} is being cloned; its owner can be told when the clone ends")
        raise ApplicationError(
            f"VMID {vmid} is taken by a guest this task did not create", type=VMID_TAKEN, non_retryable=True
        )

    @activity.defn
    def await_task(self, ref: PveTaskRef) -> None:
        """One look at the PVE task: returns if it ended well, fails (benign, retried) while it runs. A failed
        task is final for this activity; its type says whether doing the step again may succeed."""
        with task_failures_final():
            finished = self._task_done(ref.upid)
        if not finished:
            raise still_running(f"PVE task {ref.upid} is still running")

    @activity.defn
    def await_clone_by_lock(self, ref: VmRef) -> None:
        """For a clone adopted without its UPID: done when the VM no longer carries the clone lock."""
        found = self._find_vm(ref.vmid)
        if found is None:
            raise ApplicationError(
                MSG_CLONE_FAILED,
                f"the clone to VM {ref.vmid} did not complete",
                type=Failure.CLONE_FAILED.value,
                non_retryable=True,
            )
        if found.get("lock") == "clone":
            raise still_running(f"VM {ref.vmid} is still being cloned")

    # -------------------------------------------------------------------------- configure

    @activity.defn
    def configure_vm(self, req: ConfigureInput) -> None:
        """Set cores and memory, tag the VM, and grow the boot disk; each write is absolute, so a retry is safe."""
        with self._heartbeats.during(), final_errors_as(Failure.CONFIGURE_FAILED):
            # PUT is PVE's synchronous form: it answers once the change is written, with no task to watch
            # (POST .../config would answer a UPID to await). A stopped VM takes cores and memory at once.
            upid = self.pve.put(
                f"nodes/{req.node}/qemu/{req.vmid}/config",
                cores=req.cpu_cores,
                memory=req.memory_mb,
                tags=SERVICE_TAG,
            )
            if upid:
                self._wait_or_retry(str(upid))
            if req.disk_gb > req.template_disk_gb:
                # Current PVE answers a UPID, older PVE null (the resize is then already done).
                upid = self.pve.put(
                    f"nodes/{req.node}/qemu/{req.vmid}/resize", disk=req.disk_key, size=f"{req.disk_gb}G"
                )
                if upid:
                    self._wait_or_retry(str(upid))

    # ---------------------------------------------------------------------------- cleanup

    @activity.defn
    def destroy_vm(self, ref: VmRef) -> None:
        """Remove the VM this task created, with its disks; nothing if it is gone or is not this task's."""
        with self._heartbeats.during():
            found = self._find_vm(ref.vmid)
            if found is None or found.get("type") != "qemu":
                return
            node = found["node"]
            if found.get("lock") == "clone":
                # Before its owner can even be told (real PVE writes the description when the copy is done).
                raise still_running(f"VM {ref.vmid} is still being cloned; it can be removed once the clone ends")
            if not self._owned_by(ref.task_id, node, ref.vmid):
                activity.logger.warning("VM %s is not task %s's; leaving it alone", ref.vmid, ref.task_id)
                return
            if found.get("status") == "running":
                self._wait_or_retry(str(self.pve.post(f"nodes/{node}/qemu/{ref.vmid}/status/stop")))
            upid = self.pve.delete(f"nodes/{node}/qemu/{ref.vmid}", purge=1, **{"destroy-unreferenced-disks": 1})
            if upid:
                self._wait_or_retry(str(upid))

    # ---------------------------------------------------------------------------- helpers

    def _template_disk(self, node: str, vmid: int) -> tuple[str, int]:
        """The template's boot disk (key and size), read from its config at most every few minutes."""
        cached = self._template_disks.get((node, vmid))
        if cached is not None and time.monotonic() - cached[0] < TEMPLATE_DISK_TTL:
            return cached[1]
        with final_errors_as(Failure.TEMPLATE_NOT_FOUND, MSG_TEMPLATE_NOT_FOUND):
            config = self.pve.get(f"nodes/{node}/qemu/{vmid}/config")
        disk = boot_disk(config)
        if disk is None:
            raise refuse(Failure.INVALID_REQUEST, "The template VM has no disk")
        self._template_disks[(node, vmid)] = (time.monotonic(), disk)
        return disk

    def _find_vm(self, vmid: int) -> dict[str, Any] | None:
        for vm in self.pve.get("cluster/resources", type="vm"):
            if int(vm["vmid"]) == vmid:
                return dict(vm)
        return None

    def _owned_by(self, task_id: str, node: str, vmid: int) -> bool:
        """The VM's description carries this task's marker on a line of its own (task ids may prefix others)."""
        config = self.pve.get(f"nodes/{node}/qemu/{vmid}/config")
        return vm_description(task_id) in (line.strip() for line in str(config.get("description", "")).splitlines())

    def _wait(self, upid: str, limit: float) -> bool:
        """Poll the task until it ends (True) or `limit` seconds pass (False); raise if it failed. Callers
        run inside self._heartbeats.during(), which keeps the activity alive meanwhile. One look
        right after the start catches tasks that end at once (a resize, a clone of a small template); then
        the looks grow apart as the task ages (a few for a task of seconds), like a person watching it would."""
        started = time.monotonic()
        look_at, interval = EARLY_LOOK, POLL_FIRST
        while look_at <= limit:
            time.sleep(max(0.0, started + look_at - time.monotonic()))
            if self._task_done(upid):
                return True
            if look_at < POLL_FIRST:
                scheduled = POLL_FIRST
            else:
                interval = min(interval * POLL_GROWTH, POLL_MAX_INLINE)
                scheduled = look_at + interval
            # After a slow answer, the next look still waits its turn instead of following at once.
            look_at = max(scheduled, time.monotonic() - started + EARLY_LOOK)
        return False

    def _task_done(self, upid: str) -> bool:
        """One look at a PVE task: False while it runs, True if it ended well; PveTaskFailed if it did not."""
        status = self.pve.get(f"nodes/{upid_node(upid)}/tasks/{upid}/status")
        if status.get("status") != "stopped":
            return False
        exit_status = str(status.get("exitstatus", ""))
        if exit_status == "OK" or exit_status.startswith("WARNINGS"):
            return True
        raise PveTaskFailed(exit_status)

    def _wait_or_retry(self, upid: str) -> None:
        try:
            finished = self._wait(upid, SHORT_TASK_WAIT)
        except PveTaskFailed as exc:
            if is_transient_task_error(str(exc)):
                # Another task held the VM's lock: a retry of the whole (idempotent) step may well succeed.
                raise PveUnavailable(str(exc)) from exc
            raise PveError(500, str(exc)) from exc
        if not finished:
            raise PveUnavailable(f"PVE task {upid} did not end within {SHORT_TASK_WAIT:.0f} s")


class PveTaskFailed(Exception):
    """A PVE task that ended with an error: its exit status."""
