"""The clone-slot queue: first come, first served; a freed slot is handed over in the same transaction."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine
from sqlmodel import select

from db import clone_slots
from db.engine import session
from db.models import CloneGrant, CloneSlot

pytestmark = pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)


LIMITS = clone_slots.Limits(per_node=1, per_storage=2)


def ask(engine: Engine, task_id: str, node: str = "pve1", storage: str = "NFS") -> bool:
    return clone_slots.acquire(engine, task_id, node, storage, LIMITS)


def test_slots_are_handed_over_in_the_order_asked(engine: Engine) -> None:
    assert ask(engine, "a") is True
    assert ask(engine, "b") is False
    assert ask(engine, "c") is False
    assert ask(engine, "b") is False  # asking again keeps its place
    assert ask(engine, "x", node="pve2") is True  # another node: its own limit (the storage allows 2)
    assert ask(engine, "y", node="pve3") is False  # the storage's 2 are taken
    assert clone_slots.release(engine, "a", LIMITS) == ["b"]
    assert ask(engine, "b") is True  # it holds the slot it was handed
    assert ask(engine, "d") is False  # a newcomer does not overtake c
    assert clone_slots.release(engine, "x", LIMITS) == ["y"]
    assert clone_slots.release(engine, "b", LIMITS) == ["c"]
    assert clone_slots.release(engine, "c", LIMITS) == ["d"]
    assert clone_slots.release(engine, "d", LIMITS) == []
    assert clone_slots.release(engine, "y", LIMITS) == []


def test_a_waiter_that_gives_up_leaves_the_queue(engine: Engine) -> None:
    assert ask(engine, "a") is True
    assert ask(engine, "b") is False
    assert clone_slots.release(engine, "b", LIMITS) == []  # b was cancelled while it waited
    assert clone_slots.release(engine, "a", LIMITS) == []
    assert ask(engine, "c") is True


def test_a_release_carried_out_twice_names_the_same_receivers(engine: Engine) -> None:
    """A worker that dies after the release's transaction but before the run recorded its answer makes the run
    release again. The repeat must name the waiter the slot went to, or that waiter, holding the slot without
    knowing it, sleeps until its next look at the queue (minutes)."""
    assert ask(engine, "a") is True
    assert ask(engine, "b") is False
    assert clone_slots.release(engine, "a", LIMITS) == ["b"]
    assert clone_slots.release(engine, "a", LIMITS) == ["b"]  # the repeat, on another worker
    assert ask(engine, "b") is True  # b was told and takes up its slot
    assert clone_slots.release(engine, "a", LIMITS) == []  # nobody left to tell
    assert ask(engine, "c") is False
    assert clone_slots.release(engine, "b", LIMITS) == ["c"]
    assert clone_slots.release(engine, "c", LIMITS) == []  # c ended before it was told: its grant goes too
    assert clone_slots.release(engine, "b", LIMITS) == []
    with session(engine) as db:
        assert db.exec(select(CloneGrant)).all() == []
        assert db.exec(select(CloneSlot)).all() == []


async def test_a_hand_over_tells_each_receiver_and_passes_on_the_slot_of_one_that_has_ended(engine: Engine) -> None:
    assert ask(engine, "a") is True
    assert ask(engine, "b") is False
    assert ask(engine, "c") is False
    told: list[str] = []

    async def tell(task_id: str) -> bool:
        told.append(task_id)
        return task_id != "b"  # b was cancelled while it waited, before its release took it off the queue

    assert await clone_slots.release_and_hand_over(engine, "a", LIMITS, tell) == ["c"]
    assert told == ["b", "c"]
    assert ask(engine, "c") is True
    with session(engine) as db:
        assert [slot.task_id for slot in db.exec(select(CloneSlot)).all()] == ["c"]
        assert db.exec(select(CloneGrant)).all() == []


async def test_a_hand_over_cut_short_tells_the_same_receiver_when_repeated(engine: Engine) -> None:
    assert ask(engine, "a") is True
    assert ask(engine, "b") is False

    async def unreachable(task_id: str) -> bool:
        raise ConnectionError("Temporal is unreachable")

    with pytest.raises(ConnectionError):
        await clone_slots.release_and_hand_over(engine, "a", LIMITS, unreachable)
    told: list[str] = []

    async def tell(task_id: str) -> bool:
        told.append(task_id)
        return True

    assert await clone_slots.release_and_hand_over(engine, "a", LIMITS, tell) == ["b"]
    assert told == ["b"]


def test_a_waiting_task_knows_its_place_in_the_line(engine: Engine) -> None:
    limits = clone_slots.Limits(per_node=1, per_storage=0)
    assert clone_slots.acquire(engine, "holder", "pve1", "NFS", limits)
    assert not clone_slots.acquire(engine, "first", "pve1", "NFS", limits)
    assert not clone_slots.acquire(engine, "second", "pve1", "ceph", limits)  # the same node: behind "first"
    places = [clone_slots.place_in_line(engine, t) for t in ("holder", "first", "second", "unknown")]
    assert places == [0, 1, 2, 0]
    clone_slots.release(engine, "holder", limits)  # hands the slot to "first"
    assert [clone_slots.place_in_line(engine, t) for t in ("first", "second")] == [0, 1]
