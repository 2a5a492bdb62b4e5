"""Real worker processes for the tests that kill them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def process_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DATABASE_URL=settings.database_url,
        TEMPORAL_ADDRESS=settings.temporal_address,
        TEMPORAL_NAMESPACE=settings.temporal_namespace,
        TEMPORAL_TASK_QUEUE=settings.temporal_task_queue,
        PVE_HOST=settings.pve_host,
        PVE_PORT=str(settings.pve_port),
        PVE_USER=settings.pve_user,
        PVE_PASSWORD=settings.pve_password,
        PVE_CA_FILE=settings.pve_ca_file,
        DEFAULT_STORAGE=settings.default_storage,
    )
    return env


class WorkerProcess:
    """`python worker.py`, as an operator runs it."""

    def __init__(self, settings: Settings, log: Path):
        self._log = log.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "worker.py"],
            cwd=ROOT,
            env=process_env(settings),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def kill(self) -> None:
        """SIGKILL: no chance to finish anything."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._log.close()
