"""Who owns a VM on PVE: the marker `pve-boxes task <task_id>` as a whole line of its description, nothing
else (the contract's "Ownership of a VM on PVE"). Pure: no servers."""

from __future__ import annotations

import pytest

from pve.ownership import is_owned_by, task_of, vm_description

TASK = "clone-60d5ec49f1b2c8a1e4d3b2a1-1795742188053-4e28f4"


def test_the_clones_description_names_its_task() -> None:
    assert vm_description(TASK) == f"pve-boxes task {TASK}"
    assert task_of(vm_description(TASK)) == TASK
    assert is_owned_by(vm_description(TASK), TASK)


@pytest.mark.parametrize(
    "task_id", ["clone-k" + "0123456789abcdef" * 2, "clone-_box-1-ab", "delete-9", "power-x.1", "lab-a_b-c"]
)
def test_every_kind_of_task_id_reads_back(task_id: str) -> None:
    assert task_of(vm_description(task_id)) == task_id


def test_the_marker_may_be_any_line_with_whitespace_around_it() -> None:
    notes = f"Web server for course 101\n\n   pve-boxes task {TASK}\t\r\nask Bob before rebooting"
    assert task_of(notes) == TASK
    assert is_owned_by(notes, TASK)


@pytest.mark.parametrize(
    "description",
    [
        f"copied from pve-boxes task {TASK}",  # the marker inside other text
        f"pve-boxes task {TASK} (old)",  # more after the id on the same line
        f"see: pve-boxes task {TASK}\nnothing else",
        f"pve-boxes task  {TASK}",  # not the marker's exact words
        f"PVE-BOXES TASK {TASK}",
        "pve-boxes task ",
        "pve-boxes task",
        "",
        None,
    ],
)
def test_a_marker_inside_other_text_names_no_one(description: str | None) -> None:
    assert task_of(description) is None
    assert not is_owned_by(description, TASK)


def test_another_tasks_marker_is_not_ownership() -> None:
    assert not is_owned_by(vm_description("clone-other-1"), TASK)


def test_a_task_id_that_prefixes_another_is_another_task() -> None:
    assert task_of(vm_description("clone-ab")) == "clone-ab"
    assert not is_owned_by(vm_description("clone-ab"), "clone-a")
    assert not is_owned_by(vm_description("clone-a"), "clone-ab")


def test_two_different_markers_name_no_one_and_the_same_one_twice_names_it() -> None:
    both = f"{vm_description('clone-a')}\n{vm_description('clone-b')}"
    assert task_of(both) is None
    assert not is_owned_by(both, "clone-a") and not is_owned_by(both, "clone-b")
    twice = f"{vm_description('clone-a')}\nnotes\n  {vm_description('clone-a')}"
    assert task_of(twice) == "clone-a"


@pytest.mark.parametrize("task_id", ["", "clone a", "clone-a\nx", "-clone", "clone-a\x00", "clone/a"])
def test_no_marker_is_written_that_could_not_be_read_back(task_id: str) -> None:
    with pytest.raises(ValueError):
        vm_description(task_id)
