"""The custom search attributes operators filter runs by (Web UI, `temporal workflow list --query`), declared
once: temporal_client.ensure_search_attributes registers them (the API and the worker each call it as they
start), the API sets some at a run's start, and the workflows keep them current.

No imports beyond temporalio: the API, the workflows and temporal_client all import this module."""

from __future__ import annotations

from typing import Any

from temporalio.common import SearchAttributeKey, SearchAttributePair, SearchAttributeUpdate, TypedSearchAttributes

OWNER = SearchAttributeKey.for_keyword("BoxOwner")  # the user the run acts for
STEP = SearchAttributeKey.for_keyword("BoxStep")  # the step the run is at (payloads.Step, DeleteStep, PowerStep)
BOX_ID = SearchAttributeKey.for_keyword("BoxId")  # a creation's box
PVE_NODE = SearchAttributeKey.for_keyword("PveNode")  # the node the VM is (to be) on
VMID = SearchAttributeKey.for_int("VmId")  # the VM's VMID, once known; moves if a collision replaces it
SEARCH_ATTRIBUTES = (OWNER, STEP, BOX_ID, PVE_NODE, VMID)


def at_start(
    owner: str,
    *,
    box_id: str | None = None,
    node: str | None = None,
    vmid: int | None = None,
    step: str | None = None,
) -> TypedSearchAttributes:
    """The attributes a run is started with: a run that no worker has picked up yet is found by them too. A
    creation started with its first `step` too publishes only what changes as it goes (see `progress`)."""
    pairs: list[SearchAttributePair] = [SearchAttributePair(OWNER, owner)]
    if step:
        pairs.append(SearchAttributePair(STEP, step))
    if box_id:
        pairs.append(SearchAttributePair(BOX_ID, box_id))
    if node:
        pairs.append(SearchAttributePair(PVE_NODE, node))
    if vmid:
        pairs.append(SearchAttributePair(VMID, vmid))
    return TypedSearchAttributes(pairs)


def current(
    owner: str, step: str, *, box_id: str = "", node: str = "", vmid: int | None = None
) -> list[SearchAttributeUpdate[Any]]:
    """What a workflow upserts as it goes: every attribute it knows, those set at the start included (a child
    workflow's parent may not have set them). Unknown ones (empty, None) are left out, not cleared."""
    updates: list[SearchAttributeUpdate[Any]] = [OWNER.value_set(owner), STEP.value_set(step)]
    if box_id:
        updates.append(BOX_ID.value_set(box_id))
    if node:
        updates.append(PVE_NODE.value_set(node))
    if vmid:
        updates.append(VMID.value_set(vmid))
    return updates


def progress(step: str, vmid: int | None) -> list[SearchAttributeUpdate[Any]]:
    """What a run started with every attribute it knows then (`at_start` with its step) upserts as it goes: the
    step, and the VMID once known."""
    updates: list[SearchAttributeUpdate[Any]] = [STEP.value_set(step)]
    if vmid:
        updates.append(VMID.value_set(vmid))
    return updates
