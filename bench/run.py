"""`make bench`: the service's figures, each against a baseline measured in the same run.

.venv/bin/python -m bench.run [--quick] [--figures 1,3,4,4a,5] [--repeat N] [--inflight N] [--window SECONDS]
    [--load-rate R] [--load-seconds S] [--env KEY=VALUE] [--keep] [--no-write]

Starts its own Temporal dev server, fakepve, worker and API on free ports (state in a temporary directory),
prints progress to stderr and one table to stdout, writes the table and the machine into BENCHMARKS.md, and
stops every process it started, also on Ctrl-C or an error. A figure that fails shows its error in its row.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import FrameType

import httpx
from temporalio.client import Client

from bench import figures, lab_figures, load
from bench.figures import Bench, Outcome, Row
from bench.report import BENCHMARKS, table, write_benchmarks
from bench.stack import TOKEN, BenchStack, StackError, log

FIGURE_KEYS = {
    "end_to_end": [("1", "End-to-end time of one creation"), ("2", "PVE API requests per creation")],
    "admission": [("3", "Admission latency (p50)"), ("3b", "Admission latency against a bare admission's own work")],
    "throughput": [("4", "Throughput, 8 clients")],
    "admission_under_load": [("4a", "Admission latency under a steady load (p95)")],
    "in_flight": [
        ("5", "Creations admitted, clones of 10 PVE minutes"),
        ("5a", "Worker RSS, creations in flight"),
        ("5b", "Worker CPU, creations in flight"),
        ("5c", "PVE requests per in-flight creation per minute"),
        ("5d", "Admission latency while creations wait for a clone slot (p50)"),
        ("5e", "Admission latency while creations wait for a clone slot (p95)"),
    ],
    "lab_schedule": [("6", "Lab of 12 on 3 nodes against its ideal schedule")],
    "fair_turns": [("7", "Fair turns: one creation just after another user's lab")],
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and --inflight 100 (about 3 min)")
    parser.add_argument("--repeat", type=int, help="runs of figure 1 for each side (default 5, quick 3)")
    parser.add_argument("--inflight", type=int, help="creations in flight for figure 5 (default 1000, quick 100)")
    parser.add_argument("--window", type=float, help="seconds figure 5 samples the worker (default 60, quick 30)")
    parser.add_argument(
        "--figures",
        default="1,3,4,4a,5,6,7",
        help="which figures to measure, comma-separated (1 also gives 2; 4a needs 4 or --load-rate; "
        "5 gives 5a-5e; default: all, 1,3,4,4a,5,6,7)",
    )
    parser.add_argument(
        "--load-rate",
        type=float,
        help="creations a second for figure 4a (default: 60 %% of what the service sustained in figure 4)",
    )
    parser.add_argument("--load-seconds", type=float, help="seconds of each round of figure 4a (default 15, quick 8)")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the worker and the API (repeatable), e.g. CLONE_LIMIT_PER_NODE=0",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, databases)")
    parser.add_argument("--no-write", action="store_true", help="do not rewrite BENCHMARKS.md")
    args = parser.parse_args(argv)
    args.repeat = args.repeat or (3 if args.quick else 5)
    args.inflight = args.inflight or (100 if args.quick else 1000)
    args.lab_runs = 1 if args.quick else 3
    args.window = args.window or (30.0 if args.quick else 60.0)
    args.admissions = 15 if args.quick else 30
    args.creations = 24 if args.quick else 40
    args.load_seconds = args.load_seconds or (8.0 if args.quick else 15.0)
    args.figures = {part.strip() for part in args.figures.split(",") if part.strip()}
    if not args.figures <= {"1", "2", "3", "4", "4a", "5", "6", "7"}:
        parser.error("--figures takes numbers among 1,3,4,4a,5,6,7")
    if "2" in args.figures:
        args.figures.add("1")
    if "4a" in args.figures and not args.load_rate:
        args.figures.add("4")  # 4a's load is a share of what figure 4 measured
    for item in args.env:
        if "=" not in item:
            parser.error(f"--env wants KEY=VALUE, not {item!r}")
    for name in ("repeat", "inflight", "window", "load_seconds"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive")
    return args


async def measure(stack: BenchStack, args: argparse.Namespace) -> tuple[list[Row], list[str]]:
    rows: list[Row] = []
    notes: list[str] = []
    client = await Client.connect(stack.temporal_address)
    async with httpx.AsyncClient(
        base_url=stack.api_url,
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=httpx.Timeout(120),
        limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
    ) as http:
        bench = Bench(stack, client, http)
        plan: list[tuple[str, str, Callable[[], Awaitable[Outcome]], float]] = [
            ("1", "end_to_end", lambda: figures.end_to_end(bench, args.repeat), 120 + 30 * args.repeat),
            ("3", "admission", lambda: figures.admission(bench, args.admissions), 300),
            ("4", "throughput", lambda: load.throughput(bench, args.creations), 600),
            (
                "4a",
                "admission_under_load",
                lambda: load.admission_under_load(bench, args.load_seconds, args.load_rate),
                300 + 8 * args.load_seconds,
            ),
            # Before 5: figure 5 leaves its creations waiting.
            ("6", "lab_schedule", lambda: lab_figures.lab_schedule(bench, args.lab_runs), 120 + 40 * args.lab_runs),
            ("7", "fair_turns", lambda: lab_figures.fair_turns(bench, args.lab_runs), 120 + 40 * args.lab_runs),
            (
                "5",
                "in_flight",
                lambda: lab_figures.waiting(bench, args.inflight, args.window),
                420 + args.inflight + args.window,
            ),
        ]
        for figure, name, run, timeout in plan:
            if figure not in args.figures:
                continue
            started = time.monotonic()
            try:
                stack.check_alive()
                outcome = await asyncio.wait_for(run(), timeout)
                rows += outcome.rows
                notes += outcome.notes
            except Exception as exc:
                message = f"{type(exc).__name__}: {exc}".strip().splitlines()[0][:160]
                if isinstance(exc, TimeoutError):
                    message = f"timed out after {timeout:.0f} s"
                log(f"{name} failed: {message}\n{traceback.format_exc()}")
                rows += [Row(key, title, service=f"error: {message}") for key, title in FIGURE_KEYS[name]]
            log(f"{name} took {time.monotonic() - started:.0f} s")
    return rows, notes


def _stop_on_sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Ctrl-C and SIGTERM both stop the run and every process it started (SIGINT also when the shell that
    # started us in the background had it ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    workdir = Path(tempfile.mkdtemp(prefix="pve-boxes-bench-"))
    stack = BenchStack(workdir, extra_env=dict(item.split("=", 1) for item in args.env))
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    if load_before >= 0.5:
        log(f"the machine is busy (load average {load_before:.2f}): figures will be noisier")
    try:
        try:
            stack.start_all()
        except StackError as exc:
            log(f"the stack did not start: {exc}")
            return 1
        rows, notes = asyncio.run(measure(stack, args))
    except KeyboardInterrupt:
        log("interrupted; stopping everything")
        return 130
    finally:
        log("stopping every process this run started")
        stack.stop()
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    for note in notes:
        print(note, file=sys.stderr)
    print(table(rows), flush=True)
    given = sys.argv[1:] if argv is None else argv
    command = f"python -m bench.run {shlex.join(given)}".strip() if given else "make bench"
    if not args.no_write:
        write_benchmarks(rows, notes, command, load_before)
        log(f"wrote {BENCHMARKS}")
    log(f"done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
