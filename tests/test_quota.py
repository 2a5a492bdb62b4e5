"""The reservation itself under contention: threads reserving at once for one user, with no VMID conflict to
serialise them, on SQLite and PostgreSQL. Exactly what fits is admitted; release and commit happen once."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from sqlalchemy import Engine, event, text

from db import quota, vmids, vms
from db.engine import session
from db.models import COMMITTED, HELD, RELEASED, Vm, utcnow
from payloads import Failure
from tests.conftest import reservations

pytestmark = pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)

SMALL = quota.Size(cores=1, memory_mb=1024, disk_gb=10)
TINY = quota.Size(cores=1, memory_mb=1, disk_gb=1)


def created(task_id: str, vmid: int) -> quota.CreatedVm:
    return quota.CreatedVm(task_id, "alice", vmid, "pve2", "x", SMALL)


def attempt(engine: Engine, i: int) -> Any:
    try:
        # A VMID of its own: only the quota lock orders them.
        return quota.reserve(engine, f"t{i}", "alice", SMALL, free_ranges=[[1000 + i, 1000 + i]])
    except quota.Refused as refused:
        return refused.failure


def test_concurrent_reservations_admit_exactly_the_plan(engine: Engine) -> None:
    # Plan "small": at most 5 VMs in total.
    with ThreadPoolExecutor(24) as pool:
        outcomes = list(pool.map(lambda i: attempt(engine, i), range(24)))
    admitted = [o for o in outcomes if isinstance(o, int)]
    assert len(admitted) == 5
    assert len(reservations(engine, HELD)) == 5


def test_release_and_commit_happen_once(engine: Engine) -> None:
    assert attempt(engine, 1) == 1001
    assert attempt(engine, 1) == 1001  # a retried reservation is the same reservation
    assert quota.release(engine, "t1") is True
    assert quota.release(engine, "t1") is False
    assert [r.state for r in reservations(engine)] == [RELEASED]

    assert attempt(engine, 2) == 1002
    done = created("t2", 1002)
    quota.commit(engine, done)
    quota.commit(engine, done)
    assert quota.release(engine, "t2") is False  # committed quota is not given back by a late cleanup
    assert sorted(r.state for r in reservations(engine)) == [COMMITTED, RELEASED]
    assert quota.usage_of_user(engine, "alice").vms == 1


def test_a_record_that_comes_after_the_undo_of_its_creation_is_not_written(engine: Engine) -> None:
    # The merged configure-and-record activity of a run cancelled meanwhile: the run destroyed the VM and gave the
    # quota back (undo_creation) while the activity still ran. Its record must not count that VM.
    assert attempt(engine, 1) == 1001
    assert quota.undo_creation(engine, "t1") is True
    assert quota.commit(engine, created("t1", 1001), unless_given_back=True) is False
    assert [r.state for r in reservations(engine)] == [RELEASED]
    with session(engine) as db:
        assert db.get(Vm, "t1") is None
    assert quota.usage_of_user(engine, "alice").vms == 0

    # The other order: recorded first (and again, as a retry would), then undone: the record is taken back.
    assert attempt(engine, 2) == 1002
    assert quota.commit(engine, created("t2", 1002), unless_given_back=True) is True
    assert quota.commit(engine, created("t2", 1002), unless_given_back=True) is True
    assert quota.usage_of_user(engine, "alice").vms == 1
    assert quota.undo_creation(engine, "t2") is True
    assert quota.usage_of_user(engine, "alice").vms == 0
    with session(engine) as db:
        record = db.get(Vm, "t2")
        assert record is not None and record.deleted_at is not None


@pytest.mark.parametrize("first", ["undo", "record"])
def test_a_record_and_the_undo_of_its_creation_racing_leave_no_record(engine: Engine, first: str) -> None:
    # The same two at once, both queued behind a transaction that holds the user's lock (PostgreSQL's row lock,
    # SQLite's write lock), each order tried first: whichever the database lets through first, the end is the
    # same, the quota given back and no live record.
    assert attempt(engine, 1) == 1001
    ended: dict[str, bool] = {}

    def undo() -> None:
        ended["undo"] = quota.undo_creation(engine, "t1")

    def record() -> None:
        ended["record"] = quota.commit(engine, created("t1", 1001), unless_given_back=True)

    with session(engine) as holder, holder.begin():
        quota.lock_user(holder, "alice")
        threads = [threading.Thread(target=step) for step in ((undo, record) if first == "undo" else (record, undo))]
        for thread in threads:
            thread.start()
            time.sleep(0.3)  # queued in this order, most likely: the end must not depend on it
    for thread in threads:
        thread.join(30)
    assert ended["undo"] is True  # the undo always gives the quota back (and takes a record written first back)
    assert [r.state for r in reservations(engine)] == [RELEASED]
    with session(engine) as db:
        written = db.get(Vm, "t1")
        assert written is None or written.deleted_at is not None
    assert quota.usage_of_user(engine, "alice").vms == 0


def test_a_lab_admitted_again_counts_a_vm_its_retry_holds_or_made_once(engine: Engine) -> None:
    # A lab of 3 on plan "small" (5 VMs in total): VM a made at once, b made by its retry b-retry, c failed.
    ids, retries = ["a", "b", "c"], {"a": "a-retry", "b": "b-retry", "c": "c-retry"}
    assert quota.reserve_all(engine, ids, "alice", SMALL, [[100, 199]], retries) == [100, 101, 102]
    quota.commit(engine, created("a", 100))
    quota.release(engine, "b")
    assert quota.reserve(engine, "b-retry", "alice", SMALL, [[100, 199]]) == 101
    quota.commit(engine, created("b-retry", 101))
    quota.release(engine, "c")
    quota.release(engine, "c-retry")  # never ran: nothing to give back

    # The lab is reset: admitted anew, it holds quota again for c alone, and b is its retry's VM.
    assert quota.reserve_all(engine, ids, "alice", SMALL, [[100, 199]], retries) == [100, 101, 102]
    held = {r.task_id: r.vmid for r in reservations(engine, HELD)}
    assert held == {"c": 102}
    assert quota.usage_of_user(engine, "alice").vms == 3
    # Without the retries' ids, b would be held again beside the VM its retry made.
    assert quota.reserve_all(engine, ["b"], "alice", SMALL, [[100, 199]]) == [103]
    assert quota.usage_of_user(engine, "alice").vms == 4


def test_a_lab_vms_first_try_that_failed_hands_its_quota_over_to_its_retry(engine: Engine) -> None:
    # A lab of 5 fills plan "small" (5 VMs in total). VM a's first try fails and its undo runs: the quota goes
    # to a's retry, not back to the plan, so that another creation of alice's cannot take it before the lab's
    # retry is admitted (it could, and the lab, admitted whole, then lost a VM: found in a review).
    ids = ["a", "b", "c", "d", "e"]
    retries = {task_id: f"{task_id}-retry" for task_id in ids}
    assert quota.reserve_all(engine, ids, "alice", SMALL, [[100, 199]], retries) == [100, 101, 102, 103, 104]
    assert quota.undo_creation(engine, "a", hand_over=True) is True
    held = {r.task_id: r.vmid for r in reservations(engine, HELD)}
    assert held == {"a-retry": None, "b": 101, "c": 102, "d": 103, "e": 104}
    assert quota.usage_of_user(engine, "alice").vms == 5
    with pytest.raises(quota.Refused) as refused:
        quota.reserve(engine, "other", "alice", SMALL, free_ranges=[[100, 199]])
    assert refused.value.failure == Failure.TOTAL_LIMIT

    # The retry's admission chooses its VMID from what PVE shows free now (here a VM outside the service has
    # taken the first try's 100) and is not refused by the full plan; asked again, it answers the same.
    assert quota.reserve(engine, "a-retry", "alice", SMALL, free_ranges=[[150, 199]]) == 150
    assert quota.reserve(engine, "a-retry", "alice", SMALL, free_ranges=[[160, 199]]) == 150
    assert quota.usage_of_user(engine, "alice").vms == 5
    # The retry fails too: its quota goes back, and no third try holds any.
    assert quota.undo_creation(engine, "a-retry", hand_over=True) is True
    assert quota.usage_of_user(engine, "alice").vms == 4
    assert {r.task_id for r in reservations(engine, HELD)} == {"b", "c", "d", "e"}
    # A cancelled first try gives its quota back: no retry follows a cancellation.
    assert quota.undo_creation(engine, "b", hand_over=False) is True
    assert {r.task_id for r in reservations(engine, HELD)} == {"c", "d", "e"}
    # A creation outside a lab gives its quota back on undo, as before.
    assert quota.reserve(engine, "other", "alice", SMALL, free_ranges=[[100, 199]]) == 100
    assert quota.undo_creation(engine, "other", hand_over=True) is True
    assert quota.usage_of_user(engine, "alice").vms == 3


def test_a_lab_reset_before_a_retry_was_admitted_holds_its_quota_once(engine: Engine) -> None:
    ids, retries = ["a", "b"], {"a": "a-retry", "b": "b-retry"}
    assert quota.reserve_all(engine, ids, "alice", SMALL, [[100, 199]], retries) == [100, 101]
    quota.undo_creation(engine, "a", hand_over=True)  # handed over to a-retry, which the lab, reset now, never started
    assert quota.reserve_all(engine, ids, "alice", SMALL, [[100, 199]], retries) == [100, 101]
    assert {r.task_id: r.vmid for r in reservations(engine, HELD)} == {"a": 100, "b": 101}
    assert quota.usage_of_user(engine, "alice").vms == 2
    # a's first try fails again in the reset run: the quota goes over to its retry once more.
    quota.undo_creation(engine, "a", hand_over=True)
    assert {r.task_id: r.vmid for r in reservations(engine, HELD)} == {"a-retry": None, "b": 101}
    assert quota.usage_of_user(engine, "alice").vms == 2


def test_a_first_try_held_anew_takes_back_what_it_handed_over_to_its_retry(engine: Engine) -> None:
    # A lab of 5 at plan "small"'s limit is reset while a's first try runs: the reset's admission finds a held
    # and holds nothing more. Then a's first try fails and hands its quota over to a-retry; the reset run, seeing
    # no creation of a running and none made, starts a's first try again. Its admission takes the quota back
    # from a-retry, counted once, instead of asking the full plan (which counted it twice and refused it: found
    # in a review). Its reservation still names its retry, which a second failure hands the quota over to.
    ids = ["a", "b", "c", "d", "e"]
    retries = {task_id: f"{task_id}-retry" for task_id in ids}
    quota.reserve_all(engine, ids, "alice", SMALL, [[100, 199]], retries)
    quota.undo_creation(engine, "a", hand_over=True)
    assert quota.reserve(engine, "a", "alice", SMALL, free_ranges=[[100, 199]]) == 100
    assert {r.task_id: r.vmid for r in reservations(engine, HELD)} == {"a": 100, "b": 101, "c": 102, "d": 103, "e": 104}
    assert quota.usage_of_user(engine, "alice").vms == 5
    quota.undo_creation(engine, "a", hand_over=True)
    assert {r.task_id: r.vmid for r in reservations(engine, HELD)}["a-retry"] is None
    assert quota.usage_of_user(engine, "alice").vms == 5


def test_vmids_come_from_the_free_ranges_skipping_what_the_service_gave_out(engine: Engine) -> None:
    from activities.pve import free_vmid_ranges

    ranges = free_vmid_ranges({100, 101, 103, 9000})
    assert ranges == [[102, 102], [104, 8999], [9001, 999_999_999]]
    picked = [quota.reserve(engine, f"r{i}", "alice", TINY, ranges) for i in range(3)]
    # 102, then past the held ones; none of them collides with another creation in flight.
    assert picked == [102, 104, 105]


def test_the_vmid_pick_walks_past_long_runs_of_vmids_given_out(engine: Engine) -> None:
    # 150 creations in flight from 1000 (more than one read's worth: the pick reads 64, then 128), then 10 of the
    # service's VMs; the next VMID is 1160, once the VM that held it is deleted.
    with session(engine) as db, db.begin():
        for i in range(150):
            quota._hold(db, f"h{i}", "alice", TINY, 1000 + i)
        for i in range(11):
            vm = Vm(
                task_id=f"v{i}", username="bob", vmid=1150 + i, node="pve2", name="x", cores=1, memory_mb=1, disk_gb=1
            )
            vm.deleted_at = utcnow() if i == 10 else None
            db.add(vm)
    with session(engine) as db:
        assert vmids.pick_vmid(db, [[1000, 2000]]) == 1160
        assert vmids.pick_vmid(db, [[1005, 1159], [3000, 3005]]) == 3000  # the first range is all given out
        with pytest.raises(vmids.NoFreeVmid):
            vmids.pick_vmid(db, [[1000, 1159]])


def test_creations_of_different_users_never_pick_the_same_vmid(engine: Engine) -> None:
    from activities.pve import free_vmid_ranges

    ranges = free_vmid_ranges({9000})

    def reserve_for(i: int) -> Any:
        user = ("alice", "bob")[i % 2]
        return quota.reserve(engine, f"u{i}", user, TINY, ranges)

    with ThreadPoolExecutor(10) as pool:
        picked = list(pool.map(reserve_for, range(10)))
    assert sorted(picked) == list(range(100, 110))  # at the first try each, no collision to retry


def test_a_commit_during_the_usage_check_is_counted(engine: Engine) -> None:
    """A commit moves a creation from held to a VM record. The admission check reads both: it must see the move
    entirely or not at all, or it counts that creation nowhere and admits one VM too many. The commit here starts
    inside the admission's transaction, just before its usage read (one statement for both halves since stop 18;
    before, two reads, and the commit started between them): the user's lock must keep it waiting until the
    admission ends, whatever the reads."""
    for i in range(5):  # plan "small": at most 5 VMs in total, all held now
        assert attempt(engine, i) == 1000 + i
    committing = threading.Thread(target=quota.commit, args=(engine, created("t0", 1000)))

    def commit_now(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if "sum(reservation.cores)" in statement and committing.ident is None:
            committing.start()
            committing.join(timeout=2)  # done at once unless the admission's locks keep it waiting

    event.listen(engine, "before_cursor_execute", commit_now)
    try:
        assert attempt(engine, 5) == Failure.TOTAL_LIMIT
    finally:
        event.remove(engine, "before_cursor_execute", commit_now)
        committing.join()
    assert quota.usage_of_user(engine, "alice").vms == 5
    assert sorted(r.state for r in reservations(engine)) == [COMMITTED] + [HELD] * 4


def test_a_refusal_and_a_retry_never_wait_for_the_vmid_lock_that_every_users_creations_share(engine: Engine) -> None:
    """A creation holds the VMID lock (on PostgreSQL, where it exists; SQLite serialises every reservation
    anyway): a request the plan refuses answers at once, and so does a retried reservation; only a request that
    gets a VMID waits for it."""
    if engine.dialect.name != "postgresql":
        pytest.skip("the VMID lock is PostgreSQL's; SQLite's BEGIN IMMEDIATE orders all reservations")
    assert attempt(engine, 1) == 1001
    too_big = quota.Size(cores=99, memory_mb=1, disk_gb=1)
    with engine.connect() as other, ThreadPoolExecutor(4) as pool:
        other.execute(text(f"SELECT pg_advisory_xact_lock({vmids.VMID_LOCK_KEY})"))
        try:
            fitting = pool.submit(quota.reserve, engine, "b1", "bob", SMALL, [[1003, 1003]])
            over_the_limit = pool.submit(quota.reserve, engine, "a2", "alice", too_big, [[1002, 1002]])
            without_plan = pool.submit(quota.reserve, engine, "c1", "carol", SMALL, [[1004, 1004]])
            retried = pool.submit(attempt, engine, 1)
            for refused, failure in ((over_the_limit, Failure.PER_VM_LIMIT), (without_plan, Failure.PLAN_NOT_FOUND)):
                with pytest.raises(quota.Refused) as refusal:
                    refused.result(timeout=5)
                assert refusal.value.failure == failure
            assert retried.result(timeout=5) == 1001
            time.sleep(0.5)
            assert not fitting.done()  # its VMID waits for the other creation's
        finally:
            other.rollback()
        assert fitting.result(timeout=5) == 1003


def test_a_creation_reset_after_its_undo_took_its_record_back_records_the_vm_it_makes_again(engine: Engine) -> None:
    # Recorded, then undone (the VM destroyed): the creation made and kept nothing, so a lab reset makes it again
    # (vms.made_by), and so does a reset of the creation itself; the record is then the new VM's, counted and
    # listed (found by a code review: the old record stayed deleted, and the new VM counted nowhere).
    assert attempt(engine, 3) == 1003
    quota.commit(engine, created("t3", 1003))
    assert vms.made_by(engine, ["t3"]) is not None
    assert quota.undo_creation(engine, "t3") is True
    assert vms.made_by(engine, ["t3"]) is None

    assert quota.reserve(engine, "t3", "alice", SMALL, free_ranges=[[1007, 1007]]) == 1007  # the reset's admission
    assert vms.made_by(engine, ["t3"]) is None  # as a reset lab asks, after its admission held it again
    assert quota.commit(engine, created("t3", 1007)) is True
    assert quota.usage_of_user(engine, "alice").vms == 1
    [record], _ = vms.page_of_vms(engine, "alice", 10, None)
    assert (record.task_id, record.vmid) == ("t3", 1007)
    assert vms.made_by(engine, ["t3"]) is not None


def test_a_vm_its_owner_deleted_was_made_and_is_not_made_again(engine: Engine) -> None:
    assert attempt(engine, 5) == 1005
    quota.commit(engine, created("t5", 1005))
    assert vms.finish_deletion(engine, "t5") is True  # its owner deleted it
    made = vms.made_by(engine, ["t5"])
    assert made is not None and made.deleted_at is not None  # a lab reset counts it as made, and remakes nothing
    with pytest.raises(quota.Refused) as refused:
        quota.reserve(engine, "t5", "alice", SMALL, free_ranges=[[1008, 1008]])  # a reset of the creation
    assert refused.value.message == quota.MSG_VM_DELETED


def test_undoing_a_creation_takes_back_its_record_when_it_was_written(engine: Engine) -> None:
    # The compensation destroyed the VM; its record may have been written by a workflow task that then failed
    # (the run never saw it): the record must not go on counting a VM that is gone.
    assert attempt(engine, 3) == 1003
    quota.commit(engine, created("t3", 1003))
    assert quota.usage_of_user(engine, "alice").vms == 1
    assert quota.undo_creation(engine, "t3") is True
    assert quota.undo_creation(engine, "t3") is False  # once
    assert quota.usage_of_user(engine, "alice").vms == 0
    assert [r.state for r in reservations(engine)] == [RELEASED]
    with session(engine) as db:
        assert db.get(Vm, "t3").deleted_at is not None  # type: ignore[union-attr]
    # Before any record, it gives back the held quota, as release does.
    assert attempt(engine, 4) == 1004
    assert quota.undo_creation(engine, "t4") is True
    assert quota.usage_of_user(engine, "alice").vms == 0
