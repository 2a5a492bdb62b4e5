"""The clone-slot queue: a freed slot is handed over in the same transaction, in fair turns between owners (the
owner with the fewest clones running on the waiter's node or storage first; ties: the one waiting longest); one
owner's waiters are served first come, first served."""

from __future__ import annotations

import time
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine
from sqlmodel import select

from db import clone_slots
from db.engine import session
from db.models import CloneGrant, CloneSlot, CloneWaiter

pytestmark = pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)


LIMITS = clone_slots.Limits(per_node=1, per_storage=2)


def ask(engine: Engine, task_id: str, node: str = "pve1", storage: str = "NFS") -> bool:
    return clone_slots.acquire(engine, task_id, node, storage, LIMITS)


def ask_as(
    engine: Engine, owner: str, task_id: str, limits: clone_slots.Limits, node: str = "pve1", storage: str = "NFS"
) -> bool:
    return clone_slots.acquire(engine, task_id, node, storage, limits, owner=owner)


def holders(engine: Engine) -> dict[str, str]:
    """Who holds a slot now: task id -> owner."""
    with session(engine) as db:
        return {slot.task_id: slot.owner for slot in db.exec(select(CloneSlot)).all()}


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


# ------------------------------------------------------------------------------------------- fair turns

TWO_A_NODE = clone_slots.Limits(per_node=2, per_storage=0)


def queue_a_lab_then_a_single_creation(engine: Engine) -> None:
    """alice runs 2 clones on pve1 (its limit) with 6 more of her lab queued; then bob asks for one."""
    assert ask_as(engine, "alice", "a-run-1", TWO_A_NODE) is True
    assert ask_as(engine, "alice", "a-run-2", TWO_A_NODE) is True
    for n in range(1, 7):
        assert ask_as(engine, "alice", f"a-wait-{n}", TWO_A_NODE) is False
    assert ask_as(engine, "bob", "b-wait-1", TWO_A_NODE) is False


def test_a_freed_slot_goes_to_the_owner_with_fewest_clones_running_not_to_the_oldest_waiter(engine: Engine) -> None:
    queue_a_lab_then_a_single_creation(engine)

    assert clone_slots.release(engine, "a-run-1", TWO_A_NODE) == ["b-wait-1"]

    assert holders(engine) == {"a-run-2": "alice", "b-wait-1": "bob"}
    assert ask_as(engine, "bob", "b-wait-1", TWO_A_NODE) is True
    # Then alice's lab goes on in her order.
    assert clone_slots.release(engine, "a-run-2", TWO_A_NODE) == ["a-wait-1"]
    assert clone_slots.release(engine, "b-wait-1", TWO_A_NODE) == ["a-wait-2"]


def test_a_single_creation_behind_a_lab_is_told_it_is_next(engine: Engine) -> None:
    queue_a_lab_then_a_single_creation(engine)

    places = {t: clone_slots.place_in_line(engine, t) for t in ("b-wait-1", "a-wait-1", "a-wait-6", "a-run-1")}

    assert places == {"b-wait-1": 1, "a-wait-1": 2, "a-wait-6": 7, "a-run-1": 0}


def test_a_release_carried_out_twice_names_the_same_fair_receiver(engine: Engine) -> None:
    queue_a_lab_then_a_single_creation(engine)

    assert clone_slots.release(engine, "a-run-1", TWO_A_NODE) == ["b-wait-1"]
    assert clone_slots.release(engine, "a-run-1", TWO_A_NODE) == ["b-wait-1"]  # the repeat, on another worker

    assert ask_as(engine, "bob", "b-wait-1", TWO_A_NODE) is True
    assert clone_slots.release(engine, "a-run-1", TWO_A_NODE) == []
    assert set(holders(engine)) == {"a-run-2", "b-wait-1"}


def test_between_owners_without_turns_yet_the_one_waiting_longest_goes_first(engine: Engine) -> None:
    assert ask_as(engine, "carol", "carol-run-1", TWO_A_NODE) is True
    assert ask_as(engine, "carol", "carol-run-2", TWO_A_NODE) is True
    assert ask_as(engine, "bob", "bob-wait", TWO_A_NODE) is False
    assert ask_as(engine, "alice", "alice-wait", TWO_A_NODE) is False

    assert clone_slots.release(engine, "carol-run-1", TWO_A_NODE) == ["bob-wait"]
    assert clone_slots.release(engine, "carol-run-2", TWO_A_NODE) == ["alice-wait"]


def test_a_third_owner_is_not_held_behind_two_labs_taking_turns(engine: Engine) -> None:
    """alice's and bob's labs run one clone each; carol asks after both labs queued. When alice's clone ends,
    alice and carol both run none: carol, who has had no turn, goes before alice's older waiters."""
    assert ask_as(engine, "alice", "alice-1", TWO_A_NODE) is True
    assert ask_as(engine, "bob", "bob-1", TWO_A_NODE) is True
    for n in range(2, 5):
        assert ask_as(engine, "alice", f"alice-{n}", TWO_A_NODE) is False
        assert ask_as(engine, "bob", f"bob-{n}", TWO_A_NODE) is False
    assert ask_as(engine, "carol", "carol-1", TWO_A_NODE) is False

    assert clone_slots.release(engine, "alice-1", TWO_A_NODE) == ["carol-1"]
    assert clone_slots.release(engine, "bob-1", TWO_A_NODE) == ["alice-2"]  # bob just had his turn
    assert clone_slots.release(engine, "carol-1", TWO_A_NODE) == ["bob-2"]  # alice runs one, bob none
    assert clone_slots.release(engine, "alice-2", TWO_A_NODE) == ["alice-3"]  # a tie at one each: bob's is newer


def test_a_turn_on_another_node_and_storage_is_no_turn_here(engine: Engine) -> None:
    """bob holds a slot on pve2/ceph and asked for pve1/NFS before carol, who has had no turn anywhere. When
    pve1/NFS frees, both run nothing there: the one waiting longest for a turn there is bob (the contract's
    tie-break), not carol because bob holds a slot elsewhere (found by a code review)."""
    limits = clone_slots.Limits(per_node=1, per_storage=0)
    assert ask_as(engine, "alice", "alice-run", limits, node="pve1", storage="NFS") is True
    assert ask_as(engine, "bob", "bob-run", limits, node="pve2", storage="ceph") is True
    assert ask_as(engine, "bob", "bob-wait", limits, node="pve1", storage="NFS") is False
    assert ask_as(engine, "carol", "carol-wait", limits, node="pve1", storage="NFS") is False

    assert clone_slots.release(engine, "alice-run", limits) == ["bob-wait"]


def test_a_waiter_that_does_not_fit_is_passed_over_for_one_that_does(engine: Engine) -> None:
    limits = clone_slots.Limits(per_node=1, per_storage=2)
    assert ask_as(engine, "carol", "carol-run", limits, node="pve1", storage="NFS") is True
    assert ask_as(engine, "bob", "bob-run-1", limits, node="pve2", storage="ceph") is True
    assert ask_as(engine, "bob", "bob-run-2", limits, node="pve3", storage="ceph") is True  # ceph is full
    assert ask_as(engine, "erin", "erin-run", limits, node="pve4", storage="NFS") is True
    # dave runs nothing and asked first, but onto ceph; erin runs one clone on NFS.
    assert ask_as(engine, "dave", "dave-wait", limits, node="pve1", storage="ceph") is False
    assert ask_as(engine, "erin", "erin-wait", limits, node="pve1", storage="NFS") is False

    assert clone_slots.release(engine, "carol-run", limits) == ["erin-wait"]

    assert clone_slots.place_in_line(engine, "dave-wait") == 1
    assert clone_slots.release(engine, "bob-run-1", limits) == []  # pve1 is taken by erin now
    assert clone_slots.release(engine, "erin-wait", limits) == ["dave-wait"]


def queue(engine: Engine, waiters: list[tuple[str, str]]) -> None:
    """Queue (owner, task id) for pve1/NFS in this order, a millisecond apart, in one transaction: asking
    1,000 times would time the set-up, not the hand-over."""
    start = datetime.now(UTC)
    with session(engine) as db:
        for n, (owner, task_id) in enumerate(waiters):
            db.add(
                CloneWaiter(
                    task_id=task_id,
                    node="pve1",
                    storage="NFS",
                    owner=owner,
                    queued_at=start + timedelta(milliseconds=n),
                )
            )
        db.commit()


def timed_release(engine: Engine, task_id: str, limits: clone_slots.Limits, what: str) -> list[str]:
    began = time.perf_counter()
    granted = clone_slots.release(engine, task_id, limits)
    print(f"{what}: {len(granted)} granted in {time.perf_counter() - began:.3f} s")
    return granted


def test_a_thousand_waiters_from_ten_labs_get_their_turns_in_fair_order(engine: Engine) -> None:
    # Ten labs of 100, each queued whole before the next: first come, first served would serve lab 0 alone.
    labs = [(f"user{u}", f"lab{u}-{n:03d}") for u in range(10) for n in range(100)]
    queue(engine, labs)

    eight = clone_slots.Limits(per_node=8, per_storage=0)
    granted = timed_release(engine, "gone-1", eight, "8 free slots, 1,000 waiting")
    assert granted == [f"lab{u}-000" for u in range(8)]  # one each, the oldest owners first

    granted = timed_release(engine, "lab0-000", eight, "1 freed slot, 992 waiting")
    assert granted == ["lab8-000"]  # user0 runs none now, but user8 has waited longer

    wide = clone_slots.Limits(per_node=500, per_storage=0)
    granted = timed_release(engine, "gone-2", wide, "492 free slots, 991 waiting")
    assert len(granted) == 492
    running = Counter(holders(engine).values())
    assert running == {f"user{u}": 50 for u in range(10)}  # even, whoever asked first
    assert sorted(t for t, owner in holders(engine).items() if owner == "user3") == [
        f"lab3-{n:03d}" for n in range(50)
    ]  # each lab in its own order
    with session(engine) as db:
        assert len(db.exec(select(CloneWaiter)).all()) == 1000 - 1 - 500  # lab0-000 has ended


def test_a_thousand_owners_with_one_waiter_each_are_served_oldest_first(engine: Engine) -> None:
    queue(engine, [(f"user{n:04d}", f"task{n:04d}") for n in range(1000)])

    granted = timed_release(engine, "nobody", clone_slots.Limits(per_node=100, per_storage=0), "1,000 owners")

    assert granted == [f"task{n:04d}" for n in range(100)]
    assert clone_slots.place_in_line(engine, "task0100") == 1
    assert clone_slots.place_in_line(engine, "task0999") == 900
