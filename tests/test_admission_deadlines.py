"""An admission's reservation held up behind a lock past its deadline writes nothing, on SQLite and PostgreSQL.

The workflow gives an admission's local activity up at the caller's deadline (or when the run is cancelled), and
then gives back what the run holds. The SDK raises CancelledError in a synchronous activity's thread when it
gives it up, which stops most late writes, but not a commit already under way, nor an activity that is not run
that way (found by a review, with an asynchronous activity: a lab's reservations written after the lab had
given them back, and held for ever). So the write checks its deadlines inside its transaction, once the locks
it waited for are held, and rolls back past them (activities.db.Deadlines), and the workflow waits for the same
deadlines before it gives back (workflows.policies.admission_settled, tests/test_workflow_fast.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlmodel import select
from temporalio.exceptions import ApplicationError

from activities.db import DbActivities, Deadlines
from db import quota
from db.clone_slots import Limits
from db.engine import session
from db.models import CloneSlot
from payloads import MSG_UNAVAILABLE, CloneSlotRequest, Failure
from tests.conftest import reservations
from tests.fast_env import request

pytestmark = pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)

HELD_FOR = 1.0  # seconds another transaction holds the user's lock
RANGES = [[100, 999]]


async def _never_called(task_id: str) -> bool:
    raise AssertionError(task_id)


@pytest.fixture
def activities(engine: Engine) -> DbActivities:
    return DbActivities(engine, Limits(per_node=2, per_storage=0), tell_slot_granted=_never_called)


@contextmanager
def user_locked(engine: Engine) -> Iterator[None]:
    """Another transaction holds alice's lock (on SQLite: the write lock) for HELD_FOR seconds from now."""
    locked = threading.Event()

    def hold() -> None:
        with session(engine) as db, db.begin():
            quota.lock_user(db, "alice")
            locked.set()
            time.sleep(HELD_FOR)

    holder = threading.Thread(target=hold)
    holder.start()
    assert locked.wait(10)
    try:
        yield
    finally:
        holder.join()


def reserve_one(activities: DbActivities, deadlines: Deadlines) -> Any:
    slot = CloneSlotRequest(task_id="t1", node="pve2", storage="NFS", owner="alice")
    return activities.reserve("t1", request(), RANGES, slot, deadlines)


def reserve_a_lab(activities: DbActivities, deadlines: Deadlines) -> Any:
    return activities.reserve_lab(["lab-1-01", "lab-1-02"], request(), RANGES, {}, deadlines)


RESERVES = pytest.mark.parametrize("reserve", [reserve_one, reserve_a_lab], ids=["creation", "lab"])


def soon() -> datetime:
    """A deadline that passes while the user's lock is held."""
    return datetime.now(UTC) + timedelta(seconds=HELD_FOR / 4)


def assert_nothing_written(engine: Engine) -> None:
    assert reservations(engine) == []
    with session(engine) as db:
        assert db.exec(select(CloneSlot)).all() == []


@RESERVES
def test_a_reservation_that_waited_past_the_callers_deadline_writes_nothing(
    engine: Engine, activities: DbActivities, reserve: Callable[[DbActivities, Deadlines], Any]
) -> None:
    with user_locked(engine), pytest.raises(ApplicationError) as refused:
        reserve(activities, Deadlines(admit_by=soon(), attempt_ends=None))
    assert (refused.value.type, refused.value.message) == (Failure.UNAVAILABLE.value, MSG_UNAVAILABLE)
    assert_nothing_written(engine)


@RESERVES
def test_a_reservation_that_waited_past_its_attempts_end_writes_nothing(
    engine: Engine, activities: DbActivities, reserve: Callable[[DbActivities, Deadlines], Any]
) -> None:
    with user_locked(engine), pytest.raises(TimeoutError):
        reserve(activities, Deadlines(admit_by=None, attempt_ends=soon()))
    assert_nothing_written(engine)


@RESERVES
def test_a_reservation_that_waited_within_its_deadlines_is_written(
    engine: Engine, activities: DbActivities, reserve: Callable[[DbActivities, Deadlines], Any]
) -> None:
    later = datetime.now(UTC) + timedelta(seconds=30)
    with user_locked(engine):
        reserve(activities, Deadlines(admit_by=later, attempt_ends=later))
    assert reservations(engine) != []
