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
        PVE_TIMEOUT_SECONDS=str(settings.pve_timeout_seconds),
        ADMISSION_TIMEOUT_SECONDS=str(settings.admission_timeout_seconds),
        CLONE_LIMIT_PER_NODE=str(settings.clone_limit_per_node),
        CLONE_LIMIT_PER_STORAGE=str(settings.clone_limit_per_storage),
    )
    return env


class ServiceProcess:
    """One of the project's processes, started as an operator starts it, its output in a log file."""

    def __init__(self, command: list[str], settings: Settings, log: Path):
        self._log = log.open("ab")
        self.process = subprocess.Popen(
            command, cwd=ROOT, env=process_env(settings), stdout=self._log, stderr=subprocess.STDOUT
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._log.close()


class WorkerProcess(ServiceProcess):
    """`python worker.py`."""

    def __init__(self, settings: Settings, log: Path):
        super().__init__([sys.executable, "worker.py"], settings, log)

    def kill(self) -> None:
        """SIGKILL: no chance to finish anything."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ApiProcess(ServiceProcess):
    """`uvicorn api.app:app` on a free port."""

    def __init__(self, settings: Settings, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "uvicorn", "api.app:app", "--host", "127.0.0.1", "--port", str(self.port)]
        super().__init__(command, settings, log)

    async def ready(self, timeout: float = 30) -> None:
        import asyncio

        import httpx

        async with httpx.AsyncClient() as client:
            for _ in range(int(timeout / 0.1)):
                try:
                    await client.get(self.url + "/docs")
                    return
                except httpx.TransportError:
                    await asyncio.sleep(0.1)
        raise AssertionError(f"API process on {self.url} did not start")


class TemporalServer:
    """A file-backed Temporal dev server of its own, so that a test can restart it."""

    def __init__(self, binary: str, db_file: Path, log: Path):
        self.binary = binary
        self.db_file = db_file
        self.port = free_port()
        self.http_port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self._log = log.open("ab")
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        import asyncio
        import socket

        self.process = subprocess.Popen(
            [
                self.binary,
                "server",
                "start-dev",
                "--db-filename",
                str(self.db_file),
                "--ip",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--http-port",
                str(self.http_port),
                "--headless",
                "--log-level",
                "error",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        for _ in range(600):
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            await asyncio.sleep(0.1)
        raise AssertionError("the Temporal dev server did not start")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
