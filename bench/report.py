"""The table, the machine it was measured on, and BENCHMARKS.md (only the generated part is rewritten)."""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from bench.figures import Row
from bench.stack import BIN, ROOT

BENCHMARKS = ROOT / "BENCHMARKS.md"
BEGIN = "<!-- bench:begin: written by `make bench`; edits between these markers are overwritten -->"
END = "<!-- bench:end -->"

HEADER = ["#", "Figure", "Service", "Baseline (same run)", "Ratio", "Goal", "Met"]


def table(rows: list[Row]) -> str:
    cells = [HEADER] + [[r.key, r.figure, r.service, r.baseline, r.ratio, r.goal, r.met] for r in rows]
    cells = [[c.replace("|", "\\|").replace("\n", " ") for c in row] for row in cells]
    widths = [max(len(row[i]) for row in cells) for i in range(len(HEADER))]

    def line(row: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024**2:.1f} GiB"
    except OSError:
        pass
    return "unknown"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"


def _temporal_cli() -> str:
    try:
        out = subprocess.run([str(BIN / "temporal"), "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.strip().removeprefix("temporal version ") or "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def machine(load_before: float | None = None) -> list[str]:
    busy = ""
    if load_before is not None:
        busy = f"- Load average (1 min) just before the run: {load_before:.2f}" + (
            " (the machine was busy with other work: figures are noisier)" if load_before >= 0.5 else ""
        )
    return [
        f"- Date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- CPU: {_cpu_model()}, {os.cpu_count()} cores",
        f"- RAM: {_ram_gib()}",
        f"- OS: {platform.platform()}",
        f"- Python {platform.python_version()}; temporalio {_version('temporalio')}; Temporal CLI {_temporal_cli()}; "
        f"fakepve {_version('fakepve')}",
        *([busy] if busy else []),
    ]


def generated(rows: list[Row], notes: list[str], command: str, load_before: float | None = None) -> str:
    return "\n".join(
        [
            BEGIN,
            "## Last run",
            "",
            f"`{command}`, on:",
            "",
            *machine(load_before),
            "",
            table(rows),
            *(["", "Details:", ""] if notes else []),
            *(f"- {note}" if not note.startswith("  ") else note for note in notes),
            END,
        ]
    )


INTRO = """# Benchmarks

"As fast as a hand-written script, and durable anyway." `make bench` (`.venv/bin/python -m bench.run`) starts
its own file-backed Temporal dev server, fakepve (`bench/fakepve_runner.py`, with a side channel that counts PVE
API requests and sets how long a clone takes), the real worker (`python worker.py`) and API (`uvicorn
api.app:app`), and measures every figure against a baseline measured in the same run, on the same servers.
A full run takes about 7 minutes on 2 cores; `--quick` (fewer repetitions, `--inflight 100`, a 30 s window,
8 s rounds of figure 4a) about 4. `--repeat N` sets the runs of figure 1, `--inflight N` and `--window S`
figure 5's creations and sampling window, `--figures 1,3` measures only some, `--env KEY=VALUE` passes a
setting to the worker and the API (e.g. `--env CLONE_LIMIT_PER_NODE=0 --env CLONE_LIMIT_PER_STORAGE=0` to see
figure 5 without clone slots), `--load-rate R` and `--load-seconds S` figure 4a's arrivals a second and the
length of its rounds, `--keep` keeps the logs and databases, `--no-write` leaves this file alone. Progress
and details go to stderr, the table to stdout. The part between the markers below is rewritten by each run;
the rest of this file is kept.

"""

HOW = """
## How each figure is measured

1. **End-to-end time**: POST `createFromBoxTemplate?wait=60` until it answers with the run ended (checked in
   Temporal), against a proxmoxer script that logs in, POSTs the full clone (`full=1`, `target`,
   `storage=ceph`), polls the task every 0.25 s, POSTs cores and memory, polls, PUTs the resize, polls.
   Clones onto `ceph` take 2 s (`ceph_slow(2)`, `time_scale=1`). One warm-up each, then alternating runs;
   medians. The details show the median service run step by step, from its Temporal history.
2. **PVE requests per creation**: fakepve's own count of every request (logins included) during those same
   runs. The worker logs in once and keeps its ticket, so its login does not recur per creation.
3. **Admission latency**: one client, POST until the answer (no `wait`), against `execute_update_with_start`
   of `BareAdmissionWorkflow` (one local activity, its update answers after it) on its own worker process
   and task queue (`bench/baseline.py`). Instant clones (`time_scale=0`); each run is let end, untimed,
   before the next request. p50; the details split it into the time inside the run (its start to the
   update's answer) and outside it. Row 3b (no goal of its own) sets the same requests against
   `BareCheckedAdmissionWorkflow`, whose local activity does the least any admission of this kind does before
   it can answer: one `cluster/resources` read with plain proxmoxer and one SQLite transaction holding a VMID.
   The three sides take turns, each after the same pause.
4. **Throughput**: 8 concurrent clients, each POSTing with `?wait=60` in a loop (update-with-start, then the
   run's result), against 8 clients each doing the same with `BareCreationWorkflow` (`bench/baseline.py`):
   a sandboxed workflow of the creation's own shape, update-with-start answered after one local activity,
   then local, remote, local, remote, local steps, the two remote activities doing the creation's PVE work
   with plain proxmoxer (the clone, its UPID watched until done; cores and memory, then the resize, watched),
   looks at a task at the service's own pace (0.05 s, then 0.25 s); its own worker process (synchronous
   activities on a thread pool, its module and proxmoxer passed through the sandbox, as the product's are)
   and task queue, on the same Temporal server and fakepve. Instant clones; one warm-up round each, then
   three rounds of 40 creations and 40 baseline runs taking turns, so that a machine getting busier or
   quieter meanwhile weighs on both; that every creation succeeded is checked after the timed loops (the
   200 of `?wait=` already says so). The details give activity attempts per creation, the median run step
   by step, and CPU milliseconds per creation of each process (from `/proc/<pid>/stat`).
4a. **Admission under a steady load**: creations arrive at 60 % of the creations a second the service
   sustained in figure 4 (`--load-rate` sets another rate), open loop: each POST (no `wait`) is sent at its
   time whether or not the earlier ones were answered, and each run is let end, untimed. Against
   update-with-start of `BareCreationWorkflow` (its update's answer) at the same rate. Instant clones; one
   short warm-up each, then two rounds of 15 s (`--load-seconds`) for each side, taking turns; p95.
5. **Creations in flight**: N creations (default 500) asked for by 16 clients (row 5 counts those admitted;
   after 32 refusals in a row no more are sent), each waiting on a clone of 10
   PVE minutes (`ceph_slow(600)`, `time_scale=1`). Once they are admitted and their clones run, the worker's
   RSS (`/proc/<pid>/status` VmRSS, peak of samples every 5 s) and CPU (`utime+stime` of `/proc/<pid>/stat`)
   are sampled over 60 s, with the PVE requests in that window. Baselines: the same worker idle just before;
   for requests, the script's task-status looks per minute from figure 1. Then everything is stopped.

## What each optimisation bought

| Change | Figure | Before | After |
|--------|--------|--------|-------|
| _(to be filled by the team: one line per optimisation, with the figures of `make bench` before and after)_ | | | |
"""


def write_benchmarks(
    rows: list[Row], notes: list[str], command: str, load_before: float | None = None, path: Path = BENCHMARKS
) -> None:
    block = generated(rows, notes, command, load_before)
    if path.exists():
        text = path.read_text()
        if BEGIN in text and END in text:
            head, _, rest = text.partition(BEGIN)
            _, _, tail = rest.partition(END)
            path.write_text(head + block + tail)
        else:
            # Someone's own file without the markers: keep it all, add the run at the end.
            path.write_text(text.rstrip("\n") + "\n\n" + block + "\n")
        return
    path.write_text(INTRO + block + "\n" + HOW)
