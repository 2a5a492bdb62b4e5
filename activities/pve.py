"""Every PVE call the workflow makes, as activities. Activities are idempotent for their task id: Temporal may
run one more than once (a retry, a worker crash, a reset from the Web UI) and the world must end up the same.
The PVE helpers they are made of (client, tasks, ownership, VM lookup and removal) are in `pve/`, which the
repair tool (`reconcile/`) uses too."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.failures import final_errors_as, refuse, still_running, task_failures_final, vm_not_ours
from activities.heartbeats import Heartbeats
from payloads import (
    MSG_CLONE_FAILED,
    MSG_PVE_NOT_READY,
    MSG_TEMPLATE_NOT_FOUND,
    SERVICE_TAG,
    VMID_TAKEN,
    AddressWatch,
    CloneInput,
    CloneStarted,
    ConfigureInput,
    Failure,
    InspectInput,
    PveTaskRef,
    TemplateFacts,
    VmRef,
)
from pve import vm_options
from pve.agent import addresses
from pve.client import PveClient, PveError, PveUnavailable, any_refusal
from pve.disks import boot_disk
from pve.ownership import is_owned_by, vm_description
from pve.tasks import task_done, wait_task, wait_until_done
from pve.vmids import free_vmid_ranges
from pve.vms import find_vm, stop_and_destroy, vm_config

# Waiting for PVE tasks. A clone is watched inside the activity that starts it for its first seconds (most
# clones of small templates end by then); after that, each retry of await_task is one look, and the retry
# policy spaces the looks out, so that a long clone holds no worker slot while it runs.
CLONE_INLINE_WAIT = 3.0
# Short tasks (config, resize, stop, destroy) are awaited inside their activity, for this long at most.
SHORT_TASK_WAIT = 60.0
# A template's boot disk key, cached per worker: templates do not change their disk layout in passing.
TEMPLATE_DISK_TTL = 300.0
# The guest agent answers errors until the guest has booted and started it: looked at again after 1 s, then
# further apart, at most every 5 s.
AGENT_FIRST_PAUSE = 1.0
AGENT_MAX_PAUSE = 5.0


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
        can take the clone. One cluster-wide read and one config read (cached). The client's mistakes (400)
        come before PVE's passing troubles (503), which it may simply wait out."""
        return self.check_template(req, self.cluster_resources())

    def cluster_resources(self) -> list[dict[str, Any]]:
        """PVE's cluster-wide view (nodes, storages, VMs), which check_template reads."""
        return list(self.pve.get("cluster/resources"))

    def check_template(self, req: InspectInput, resources: list[dict[str, Any]]) -> TemplateFacts:
        """inspect_template on `resources`, read from PVE just before."""
        storage = req.storage or self.default_storage
        vms = [r for r in resources if r.get("type") in ("qemu", "lxc")]
        template = next((r for r in vms if r["type"] == "qemu" and int(r["vmid"]) == req.template.vmid), None)
        if template is None or not int(template.get("template") or 0):
            raise refuse(Failure.TEMPLATE_NOT_FOUND, MSG_TEMPLATE_NOT_FOUND)
        template_node = template["node"]  # where PVE has it now, even if it moved since it was registered
        nodes = {r["node"]: r.get("status") for r in resources if r.get("type") == "node"}
        if req.target not in nodes:
            raise refuse(Failure.INVALID_REQUEST, f"Unknown target node '{req.target}'")
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
        if req.target != template_node and not int(store.get("shared") or 0):
            raise refuse(
                Failure.INVALID_REQUEST,
                f"Storage '{storage}' is not shared, so the template on '{template_node}' "
                f"cannot be cloned onto node '{req.target}'",
            )
        trouble = self._not_ready(nodes, template_node, req.target, store)
        if trouble:
            raise refuse(Failure.PVE_NOT_READY, f"{MSG_PVE_NOT_READY}: {trouble}")
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

    def _not_ready(self, nodes: dict[str, Any], template_node: str, target: str, store: dict[str, Any]) -> str | None:
        """What keeps PVE from taking the clone now, for a while only (a cluster without quorum, a node offline,
        a storage not active); None if nothing does."""
        if any(status != "online" for status in nodes.values()) and not self._quorate():
            return "the PVE cluster has no quorum"
        if nodes[target] != "online":
            return f"target node '{target}' is offline"
        if nodes.get(template_node) != "online":
            return f"node '{template_node}', which holds the template, is offline"
        if store.get("status") != "available":
            return f"storage '{store.get('storage')}' is not active on node '{target}'"
        return None

    def _quorate(self) -> bool:
        """Whether the cluster has quorum (`quorate` in cluster/status; cluster/resources does not say). Asked
        only while a node is offline: a cluster loses quorum only when nodes drop out of it, and
        cluster/resources shows those as offline, so a healthy cluster costs no extra read. A user who may not
        read it (Sys.Audit on /) is told nothing more: the clone retries PVE's own "no quorum" errors anyway."""
        try:
            status = self.pve.get_expecting("cluster/status", any_refusal)
        except PveError:
            return True
        cluster = next((r for r in status if r.get("type") == "cluster"), None)  # none on a single node
        return cluster is None or bool(int(cluster.get("quorate") or 0))

    # ------------------------------------------------------------------------------ clone

    # Registered through CreationActivities, which runs it and the database step that may follow.
    def start_clone(self, req: CloneInput) -> CloneStarted:
        """Start a full clone of the template as VMID req.vmid, or adopt the one an earlier attempt started."""
        try:
            description = vm_description(req.task_id)
        except ValueError as exc:  # an id no marker can carry: the run could never clean up such a VM
            raise ApplicationError(
                MSG_CLONE_FAILED, str(exc), type=Failure.CLONE_FAILED.value, non_retryable=True
            ) from exc
        with self._heartbeats.during():
            if activity.info().attempt > 1 and self._adoptable(req.task_id, req.vmid):
                return CloneStarted(upid=None)
            params: dict[str, Any] = {
                "newid": req.vmid,
                "name": req.name,
                "full": 1,
                "storage": req.storage,
                "description": description,
            }
            if req.target != req.template.node:
                params["target"] = req.target
            if req.pool:
                params["pool"] = req.pool  # PVE adds the VM to the pool once the clone ends
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
                finished = wait_task(self.pve, upid, CLONE_INLINE_WAIT)
            return CloneStarted(upid=upid, finished=finished)

    def _adoptable(self, task_id: str, vmid: int) -> bool:
        """True if VM vmid exists and this task made it; a guest of someone else's under our VMID is final."""
        found = find_vm(self.pve, vmid)
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
            finished = task_done(self.pve, ref.upid)
        if not finished:
            raise still_running(f"PVE task {ref.upid} is still running")

    @activity.defn
    def await_clone_by_lock(self, ref: VmRef) -> None:
        """For a clone adopted without its UPID: done when the VM no longer carries the clone lock."""
        found = find_vm(self.pve, ref.vmid)
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

    # Registered through CreationActivities, which runs it and the database step that may follow.
    def configure_vm(self, req: ConfigureInput) -> None:
        """Set cores, memory, tags, network and cloud-init in one write, then grow the boot disk, on this task's
        VM only. Each write carries the digest of the config whose marker was checked just before, so PVE
        refuses it if the config changed since: a VM that vanished and whose VMID someone else took is never
        configured. Each write is absolute (the tags a union with what the VM has), so a retry is safe."""
        with self._heartbeats.during(), final_errors_as(Failure.CONFIGURE_FAILED):
            config = self._own_config(req.task_id, req.node, req.vmid)
            params = self._settings_for(req, config)
            # PUT is PVE's synchronous form: it answers once the change is written (a stopped VM takes cores and
            # memory at once). A write that adds a drive allocates a volume, for which PVE recommends its
            # asynchronous form, POST, whose task is awaited. Either may answer a UPID, or null.
            write = self.pve.post if any(vm_options.DRIVE_KEY.fullmatch(key) for key in params) else self.pve.put
            upid = write(f"nodes/{req.node}/qemu/{req.vmid}/config", **params, digest=config.get("digest"))
            if upid:
                wait_until_done(self.pve, str(upid), SHORT_TASK_WAIT)
            if req.disk_gb > req.template_disk_gb:
                # The write above changed the digest, and PVE tells the new one only by a read: a second look,
                # so that the resize is as safe as the config write. Current PVE answers a UPID, older PVE
                # null (the resize is then already done).
                upid = self.pve.put(
                    f"nodes/{req.node}/qemu/{req.vmid}/resize",
                    disk=req.disk_key,
                    size=f"{req.disk_gb}G",
                    digest=self._own_config(req.task_id, req.node, req.vmid).get("digest"),
                )
                if upid:
                    wait_until_done(self.pve, str(upid), SHORT_TASK_WAIT)

    def _settings_for(self, req: ConfigureInput, config: dict[str, Any]) -> dict[str, Any]:
        """The config write: cores, memory, and what makes the VM ready (pve.vm_options.ready_settings)."""
        box = req.box
        ready = vm_options.ready_settings(
            config,
            tags=[*box.tags, SERVICE_TAG],
            network=dataclasses.asdict(box.network) if box.network else {},
            cloud_init=dataclasses.asdict(box.cloud_init) if box.cloud_init else None,
            ssh_keys=req.ssh_keys,
            storage=req.storage or self.default_storage,
        )
        if ready is None:
            raise PveError(400, f"VM {req.vmid} has no free IDE or SCSI slot for a cloud-init drive")
        return {"cores": req.cpu_cores, "memory": req.memory_mb, **ready}

    # ------------------------------------------------------------------------- start

    @activity.defn
    def start_vm(self, ref: VmRef) -> None:
        """Start this task's VM and await PVE's task. Running already (an earlier attempt's start): nothing."""
        with self._heartbeats.during(), final_errors_as(Failure.CONFIGURE_FAILED):
            self._own_config(ref.task_id, ref.node, ref.vmid)
            path = f"nodes/{ref.node}/qemu/{ref.vmid}/status"
            if self.pve.get(f"{path}/current").get("status") == "running":
                return
            upid = self.pve.post(f"{path}/start")
            if upid:
                wait_until_done(self.pve, str(upid), SHORT_TASK_WAIT)

    @activity.defn
    def vm_addresses(self, req: AddressWatch) -> list[str]:
        """The addresses the guest agent reports, asked until one comes or `req.seconds` have passed since the
        first attempt was scheduled (then none: an address that does not come is no failure). Until the guest
        has booted, the agent answers errors: those are expected, and asked again, further apart."""
        deadline = activity.info().scheduled_time.timestamp() + req.seconds
        vm = req.vm
        with self._heartbeats.during():
            if not vm_options.agent_enabled(self._own_config(vm.task_id, vm.node, vm.vmid).get("agent")):
                return []  # the template does not enable the agent: nothing will ever answer
            pause = AGENT_FIRST_PAUSE
            while True:
                try:
                    path = f"nodes/{vm.node}/qemu/{vm.vmid}/agent/network-get-interfaces"
                    answer = self.pve.get_expecting(path, any_refusal)
                    found = addresses(answer.get("result") or [])
                except (PveError, PveUnavailable) as exc:
                    activity.logger.debug("guest agent of VM %s: %s", vm.vmid, exc)
                    found = []
                left = deadline - time.time()
                if found or left <= 0:
                    return found
                time.sleep(min(pause, left))
                pause = min(pause * 1.5, AGENT_MAX_PAUSE)

    # ---------------------------------------------------------------------------- cleanup

    @activity.defn
    def destroy_vm(self, ref: VmRef) -> bool | None:
        """Remove the VM this task created, with its disks; nothing if it is gone or is not this task's. True if
        this call destroyed it. (None is what a worker from before this answer recorded: histories keep it.)"""
        with self._heartbeats.during():
            found = find_vm(self.pve, ref.vmid)
            if found is None or found.get("type") != "qemu":
                return False
            node = found["node"]
            if found.get("lock") == "clone":
                # Before its owner can even be told (real PVE writes the description when the copy is done).
                raise still_running(f"VM {ref.vmid} is still being cloned; it can be removed once the clone ends")
            if not self._owned_by(ref.task_id, node, ref.vmid):
                activity.logger.warning("VM %s is not task %s's; leaving it alone", ref.vmid, ref.task_id)
                return False
            stop_and_destroy(self.pve, node, ref.vmid, running=found.get("status") == "running", limit=SHORT_TASK_WAIT)
            return True

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

    def _own_config(self, task_id: str, node: str, vmid: int) -> dict[str, Any]:
        """The VM's config, if the VM is this task's (pve.ownership's rule); a VM gone, or one without the task's
        marker, is final for the step. A write made with its `digest` changes this very config or nothing (PVE
        answers "file changed by other user? Try again", which is retried)."""
        config = vm_config(self.pve, node, vmid)
        if config is None:
            raise vm_not_ours(f"VM {vmid} is gone from node {node}")
        if not is_owned_by(config.get("description"), task_id):
            raise vm_not_ours(f"VM {vmid} on node {node} is not task {task_id}'s: its description lacks the marker")
        return config

    def _owned_by(self, task_id: str, node: str, vmid: int) -> bool:
        """The VM's description carries this task's marker (pve.ownership's rule). A VM that vanished since it
        was listed is a PveError, retried: the next attempt sees it gone."""
        return is_owned_by(self.pve.get(f"nodes/{node}/qemu/{vmid}/config").get("description"), task_id)
