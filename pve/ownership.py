"""Whose a VM on PVE is: the marker line `pve-boxes task <task_id>` that the clone writes into the VM's
description, written and read here only.

The rule (the contract's "Ownership of a VM on PVE"): a VM is one task's when a line of its description, with
the whitespace around it stripped, is exactly that marker. A marker somewhere inside other text (notes that
quote it, a line with more after the id) names no one, and neither does a description naming two different
tasks (edited by hand: nobody can tell whose it is). The `pve-boxes` tag is a label for people, not proof.

Light on purpose: `payloads` and workflow code may import this module.
"""

import re

OWNER_MARK = "pve-boxes task "
# The service's task ids start with their kind (`clone-<box>-<ms>-<hex>`, `clone-k<32 hex>`; `delete-...`,
# `power-...`, `lab-...`) and hold letters, digits, `_`, `.` and `-` only (a box id is reduced to these):
# nothing that could run into the text around a marker.
TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_MARKER_LINE = re.compile(re.escape(OWNER_MARK) + f"({TASK_ID.pattern})")


def vm_description(task_id: str) -> str:
    """The description a clone is given: the marker of its task, which task_of reads back."""
    if not TASK_ID.fullmatch(task_id):
        # A marker the reader cannot read would make the VM nobody's: its own run could not clean it up.
        raise ValueError(f"task id {task_id!r} cannot be written as an owner marker")
    return f"{OWNER_MARK}{task_id}"


def task_of(description: object) -> str | None:
    """The task a VM's description names as its owner; None if it names none, or two different ones."""
    named = {
        match.group(1)
        for line in str(description or "").splitlines()
        if (match := _MARKER_LINE.fullmatch(line.strip()))
    }
    return named.pop() if len(named) == 1 else None


def is_owned_by(description: object, task_id: str) -> bool:
    """True if the description names task_id, and only it, as the VM's owner."""
    return task_of(description) == task_id
