"""Telling a run waiting for a clone slot that it has one: the `tell` that db.clone_slots.release_and_hand_over
takes, used by the workflow's release_clone_slot activity (worker.py binds it to the worker's client) and by
the repair tool. Not workflow code: it talks to the Temporal server through a client."""

from __future__ import annotations

from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from workflows.create_from_box import CreateFromBoxWorkflow


async def tell_slot_granted(client: Client, task_id: str) -> bool:
    """Signal the run of `task_id` that it holds a clone slot now. False if there is no such run or it has
    ended (the server answers NOT_FOUND for both): its slot is to be freed. Other errors are raised."""
    handle = client.get_workflow_handle(task_id)
    try:
        await handle.signal(CreateFromBoxWorkflow.clone_slot_granted)
    except RPCError as exc:
        if exc.status == RPCStatusCode.NOT_FOUND:
            return False
        raise
    return True
