"""Figures 4 and 4a: the service under load against BareCreationWorkflow (bench/baseline.py), the creation's own
shape and PVE work with nothing else, on the same servers. Service and baseline take turns, so that a machine
that gets busier or quieter meanwhile (these are shared machines) weighs on both alike."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Callable, Coroutine
from typing import Any

from bench.figures import Bench, Outcome, Row, drive, met, percentile, ratio
from bench.stack import BenchStack, cpu_seconds, log
from bench.timeline import RunSummary, summary, timeline

THROUGHPUT_ROUNDS = 3  # figure 4: service and baseline take turns this often
LOAD_ROUNDS = 2  # figure 4a: likewise
LOAD_SHARE = 0.6  # figure 4a: the steady load, as a share of the creations a second figure 4 measured
THROUGHPUT_GOAL = 0.9
LOAD_GOAL = 1.5


# ---------------------------------------------------------------------- figure 4


async def throughput(bench: Bench, total: int, clients: int = 8) -> Outcome:
    """Creations completed per second with 8 concurrent clients each waiting for its run, against the bare
    creation workflow started and waited for the same way."""
    await asyncio.to_thread(bench.stack.pve_clone_seconds, 0, 0)
    log(f"figure 4: throughput, {total} creations by {clients} concurrent clients (instant clones)")

    service_ids: list[str] = []

    async def service_once(_i: int) -> None:
        # POST with ?wait= answers once the run has ended (update-with-start, then its result), as the baseline
        # below; that each run succeeded is checked after the timed loop, so the harness's checks are not timed.
        _elapsed, task_id = await bench.post_create(bench.name("tput"), wait=60)
        service_ids.append(task_id)

    async def baseline_once(_i: int) -> None:
        _elapsed, workflow_id = await bench.bare_admit(bench.name("bare"))
        await bench.run_ended(workflow_id)

    await drive(clients, clients, service_once)  # warm-up
    await drive(clients, clients, baseline_once)
    service_ids.clear()
    service_seconds = baseline_seconds = 0.0
    service_cpu: dict[str, float] = {}
    baseline_cpu: dict[str, float] = {}
    for _ in range(THROUGHPUT_ROUNDS):
        before = cpu_snapshot(bench.stack)
        service_seconds += await drive(clients, total, service_once)
        middle = cpu_snapshot(bench.stack)
        baseline_seconds += await drive(clients, total, baseline_once)
        after = cpu_snapshot(bench.stack)
        _add(service_cpu, before, middle)
        _add(baseline_cpu, middle, after)
    for task_id in service_ids:
        await bench.ended_well(task_id, timeout=5)
    done = total * THROUGHPUT_ROUNDS
    service_rate, baseline_rate = done / service_seconds, done / baseline_seconds
    bench.service_rate = service_rate
    log(f"  service {service_rate:.2f} /s, baseline {baseline_rate:.2f} /s")
    row = Row(
        "4",
        f"Throughput, creations completed per second, {clients} clients each waiting for its run "
        f"({THROUGHPUT_ROUNDS}x{total} creations)",
        f"{service_rate:.2f} /s",
        f"{baseline_rate:.2f} /s (bare creation workflow)",
        ratio(service_rate, baseline_rate),
        f">= {THROUGHPUT_GOAL}x",
        met(service_rate / baseline_rate >= THROUGHPUT_GOAL),
    )
    notes: list[str] = []
    try:
        runs = [await summary(bench.client, task_id) for task_id in service_ids]
        notes.append(f"Figure 4: activity attempts per creation, mean (max): {_attempts(runs)}.")
        ended = [r.ended_after for r in runs if r.ended_after is not None]
        notes.append(
            f"Figure 4: a creation's run took {statistics.median(ended):.2f} s at the median "
            f"({max(ended):.2f} s at most) under {clients} clients; the service completed {service_rate:.2f} "
            f"/s against the baseline's {baseline_rate:.2f} /s."
        )
        median_id = sorted(
            (r.ended_after, task_id) for r, task_id in zip(runs, service_ids, strict=True) if r.ended_after is not None
        )[len(ended) // 2][1]
        notes.append("Figure 4, the median run, from its history:")
        notes += [f"  - {line}" for line in await timeline(bench.client, median_id)]
    except Exception as exc:
        notes.append(f"Figure 4: (no histories: {exc})")
    notes.append(
        "Figure 4: CPU ms per creation, service: "
        + _cpu_per(service_cpu, done, ("worker", "api", "temporal", "fakepve", "harness"))
        + "; baseline: "
        + _cpu_per(baseline_cpu, done, ("baseline", "temporal", "fakepve", "harness"))
        + f" ({os.cpu_count()} cores for all of them)."
    )
    return Outcome([row], notes)


# ---------------------------------------------------------------------- figure 4a


async def admission_under_load(bench: Bench, seconds: float, rate: float | None = None) -> Outcome:
    """Admission p95 with creations arriving at a steady rate (open loop: each at its time, whether or not the
    earlier ones were answered), 60 % of what the service sustained in figure 4, against the bare creation
    workflow at the same rate."""
    share = f"{LOAD_SHARE * 100:.0f} % of figure 4's"
    if rate is None:
        if bench.service_rate is None:
            raise RuntimeError("figure 4a needs figure 4's rate (or --load-rate)")
        rate = LOAD_SHARE * bench.service_rate
    else:
        share = "--load-rate"
    await asyncio.to_thread(bench.stack.pve_clone_seconds, 0, 0)
    count = max(1, round(rate * seconds))
    log(f"figure 4a: admission under a steady {rate:.2f} creations/s, {LOAD_ROUNDS}x{count} each (instant clones)")

    async def service_once(i: int) -> float:
        elapsed, task_id = await bench.post_create(bench.name("load"))
        await bench.run_ended(task_id)  # untimed: the round ends once every run has (raises if one failed)
        return elapsed

    async def baseline_once(i: int) -> float:
        elapsed, workflow_id = await bench.bare_admit(bench.name("bare-load"))
        await bench.run_ended(workflow_id)
        return elapsed

    await open_loop(rate, min(count, 8), service_once)  # warm-up
    await open_loop(rate, min(count, 8), baseline_once)
    service: list[float] = []
    baseline: list[float] = []
    lag = 0.0
    for _ in range(LOAD_ROUNDS):
        times, late = await _timed_open_loop(rate, count, service_once)
        service += times
        lag = max(lag, late)
        times, late = await _timed_open_loop(rate, count, baseline_once)
        baseline += times
        lag = max(lag, late)
    service_p95, baseline_p95 = percentile(service, 95), percentile(baseline, 95)
    log(f"  service p95 {service_p95 * 1000:.1f} ms, baseline p95 {baseline_p95 * 1000:.1f} ms")
    row = Row(
        "4a",
        f"Admission latency at a steady {rate:.1f} creations/s ({share}), p95 of {len(service)}",
        f"{service_p95 * 1000:.0f} ms",
        f"{baseline_p95 * 1000:.0f} ms (bare creation workflow)",
        ratio(service_p95, baseline_p95),
        f"<= {LOAD_GOAL}x",
        met(service_p95 / baseline_p95 <= LOAD_GOAL),
    )
    notes = [
        f"Figure 4a: service p50 {statistics.median(service) * 1000:.0f} ms, max {max(service) * 1000:.0f} ms; "
        f"baseline p50 {statistics.median(baseline) * 1000:.0f} ms, max {max(baseline) * 1000:.0f} ms; "
        f"{LOAD_ROUNDS} rounds of {count} arrivals each side, taking turns; arrivals sent at most "
        f"{lag * 1000:.0f} ms after their time."
    ]
    return Outcome([row], notes)


async def open_loop(rate: float, count: int, one: Callable[[int], Coroutine[Any, Any, float]]) -> list[float]:
    return (await _timed_open_loop(rate, count, one))[0]


async def _timed_open_loop(
    rate: float, count: int, one: Callable[[int], Coroutine[Any, Any, float]]
) -> tuple[list[float], float]:
    """Start one(i) at i / rate seconds from now for each i < count, each on its own; returns their results in
    order, once all have ended, and how late the harness started the latest one (it shares the machine)."""
    started = time.perf_counter()
    tasks: list[asyncio.Task[float]] = []
    late = 0.0
    for i in range(count):
        due = started + i / rate
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        late = max(late, time.perf_counter() - due)
        tasks.append(asyncio.create_task(one(i)))
    return list(await asyncio.gather(*tasks)), late


# ---------------------------------------------------------------------- helpers


def cpu_snapshot(stack: BenchStack) -> dict[str, float]:
    """CPU seconds used so far by each process of the stack, and by this harness process."""
    snapshot = {proc.name: cpu_seconds(proc.pid) for proc in stack.procs if proc.alive()}
    times = os.times()
    snapshot["harness"] = times.user + times.system
    return snapshot


def _add(total: dict[str, float], before: dict[str, float], after: dict[str, float]) -> None:
    for name in before.keys() & after.keys():
        total[name] = total.get(name, 0.0) + after[name] - before[name]


def _cpu_per(used: dict[str, float], count: int, names: tuple[str, ...]) -> str:
    """CPU ms per item of each named process, from the CPU seconds it used."""
    return ", ".join(f"{name} {1000 * used[name] / count:.0f}" for name in names if name in used)


def _attempts(runs: list[RunSummary]) -> str:
    kinds = sorted({kind for run in runs for kind in run.attempts})
    parts = []
    for kind in kinds:
        counts = [run.attempts.get(kind, 0) for run in runs]
        parts.append(f"`{kind}` {statistics.mean(counts):.1f} ({max(counts)})")
    return ", ".join(parts)
