"""The bare Temporal baselines: the least a workflow can do for the same shape of work, on the same server.

python -m bench.baseline --address 127.0.0.1:7233 --task-queue bench-baseline

- BareAdmissionWorkflow: started with update-with-start; runs one local activity, and its `admitted` update
  answers once that is done (what the service's admission does, less the work itself).
- SixNoOpsWorkflow: six no-op activities one after another (about as many steps as a creation).

Run as a process of its own, like the product's worker, and prints `baseline worker ready` once it polls.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from datetime import timedelta

from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.worker import Worker

READY = "baseline worker ready"


@activity.defn
async def noop(step: int) -> int:
    return step


@workflow.defn
class BareAdmissionWorkflow:
    def __init__(self) -> None:
        self._admitted = False

    @workflow.update
    async def admitted(self) -> bool:
        await workflow.wait_condition(lambda: self._admitted)
        return True

    @workflow.run
    async def run(self) -> None:
        await workflow.execute_local_activity(noop, 0, start_to_close_timeout=timedelta(seconds=30))
        self._admitted = True
        await workflow.wait_condition(workflow.all_handlers_finished)


@workflow.defn
class SixNoOpsWorkflow:
    @workflow.run
    async def run(self) -> int:
        total = 0
        for step in range(6):
            total += await workflow.execute_activity(noop, step, start_to_close_timeout=timedelta(seconds=30))
        return total


async def serve(address: str, task_queue: str) -> None:
    client = await Client.connect(address)
    worker = Worker(
        client,
        task_queue=task_queue,
        workflows=[BareAdmissionWorkflow, SixNoOpsWorkflow],
        activities=[noop],
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with worker:
        print(READY, flush=True)
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True)
    parser.add_argument("--task-queue", default="bench-baseline")
    args = parser.parse_args()
    asyncio.run(serve(args.address, args.task_queue))


if __name__ == "__main__":
    main()
