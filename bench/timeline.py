"""Where a run's time goes: its history as steps with their times from the run's start."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime

from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import HistoryEvent
from temporalio.client import Client


def _when(event: HistoryEvent, start: datetime) -> float:
    return (event.event_time.ToDatetime() - start).total_seconds()


def _local_activity(event: HistoryEvent) -> str:
    """The activity type of a local-activity marker (best effort: the marker's data is SDK-internal JSON)."""
    try:
        payload = event.marker_recorded_event_attributes.details["data"].payloads[0]
        return str(json.loads(payload.data)["activity_type"])
    except (KeyError, IndexError, ValueError, TypeError):
        return ""


async def timeline(client: Client, workflow_id: str) -> list[str]:
    """One line per step: `+0.123 s activity start_clone scheduled, last attempt (1) started +0.130, completed
    +0.180`; local activities, the update's answer and the run's end too."""
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    events = list(history.events)
    if not events:
        return []
    start = events[0].event_time.ToDatetime()
    # Each item is a finished line, or an activity's dict that later events fill in.
    items: list[str | dict[str, object]] = []
    activities: dict[int, dict[str, object]] = {}
    for event in events:
        t = _when(event, start)
        kind = event.event_type
        name = EventType.Name(kind).removeprefix("EVENT_TYPE_")
        if kind == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            activity: dict[str, object] = {
                "name": event.activity_task_scheduled_event_attributes.activity_type.name,
                "scheduled": t,
            }
            activities[event.event_id] = activity
            items.append(activity)
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            attrs = event.activity_task_started_event_attributes
            activities.get(attrs.scheduled_event_id, {}).update(started=t, attempt=attrs.attempt)
        elif kind in ENDED:
            scheduled = (
                event.activity_task_completed_event_attributes.scheduled_event_id
                or event.activity_task_failed_event_attributes.scheduled_event_id
                or event.activity_task_timed_out_event_attributes.scheduled_event_id
            )
            activities.get(scheduled, {}).update(ended=t, outcome=name.removeprefix("ACTIVITY_TASK_").lower())
        elif kind == EventType.EVENT_TYPE_MARKER_RECORDED:
            local = _local_activity(event)
            marker = event.marker_recorded_event_attributes.marker_name
            items.append(f"+{t:.3f} s " + (f"local activity {local} recorded" if local else f"marker {marker}"))
        elif kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_COMPLETED:
            items.append(f"+{t:.3f} s update answered (the POST's admission)")
        elif kind in RUN_ENDED:
            items.append(f"+{t:.3f} s run {name.removeprefix('WORKFLOW_EXECUTION_').lower()}")
    return [item if isinstance(item, str) else _activity_line(item) for item in items]


ENDED = (
    EventType.EVENT_TYPE_ACTIVITY_TASK_COMPLETED,
    EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED,
    EventType.EVENT_TYPE_ACTIVITY_TASK_TIMED_OUT,
)
RUN_ENDED = (EventType.EVENT_TYPE_WORKFLOW_EXECUTION_COMPLETED, EventType.EVENT_TYPE_WORKFLOW_EXECUTION_FAILED)


def _activity_line(a: dict[str, object]) -> str:
    text = f"+{a['scheduled']:.3f} s activity {a['name']} scheduled"
    if "started" in a:
        text += f", last attempt ({a['attempt']}) started +{a['started']:.3f}"
    if "ended" in a:
        text += f", {a['outcome']} +{a['ended']:.3f}"
    return text


@dataclass
class RunSummary:
    admitted_after: float | None = None  # seconds from the run's start to the update's answer
    # Seconds from the run's start until a worker took its first workflow task: the server's matching and the
    # worker's poll, before any of the workflow's own code runs.
    picked_up_after: float | None = None
    ended_after: float | None = None
    attempts: dict[str, int] = field(default_factory=dict)  # activity type -> attempts, summed over its calls


async def summary(client: Client, workflow_id: str) -> RunSummary:
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    events = list(history.events)
    out = RunSummary()
    if not events:
        return out
    start = events[0].event_time.ToDatetime()
    names: dict[int, str] = {}
    for event in events:
        kind = event.event_type
        if kind == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            names[event.event_id] = event.activity_task_scheduled_event_attributes.activity_type.name
        elif kind == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED:
            attrs = event.activity_task_started_event_attributes
            name = names.get(attrs.scheduled_event_id, "?")
            out.attempts[name] = out.attempts.get(name, 0) + attrs.attempt
        elif kind == EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED and out.picked_up_after is None:
            out.picked_up_after = _when(event, start)
        elif kind == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_UPDATE_COMPLETED and out.admitted_after is None:
            out.admitted_after = _when(event, start)
        elif kind in RUN_ENDED:
            out.ended_after = _when(event, start)
    return out
