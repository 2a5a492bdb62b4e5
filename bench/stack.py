"""The processes a benchmark run starts, each on its own free port, and stops again whatever happens.

Temporal (file-backed dev server), fakepve (bench/fakepve_runner.py), the product's worker (`python
worker.py`) and API (`uvicorn api.app:app`), and the baseline worker (bench/baseline.py). State and logs
live in one temporary directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
TASK_QUEUE = "bench-vm-manage"
BASELINE_QUEUE = "bench-baseline"
TOKEN = "bench-token-0123456789abcdefghijklmnopqrstuv"
USER = "bench"
BOX_ID = "bench-box-ubuntu"
WORKER_READY = "worker polling task queue"
BASELINE_READY = "baseline worker ready"

# A plan with no practical limits: every figure's creations fit in it at once.
ADMIN_DATA: dict[str, Any] = {
    "plans": [
        {
            "id": "bench",
            "name": "Benchmark",
            "per_vm": {"cores": 64, "memory_mb": 1048576, "disk_gb": 100000},
            "total": {"cores": 10**7, "memory_mb": 10**10, "disk_gb": 10**9},
        }
    ],
    "users": [{"username": USER, "plan": "bench", "tokens": [TOKEN]}],
    "templates": [
        {
            "id": "tpl-bench",
            "name": "Ubuntu 24.04",
            "node": "pve1",
            "vmid": 9000,
            "public": False,
            "allowed_users": [USER],
        }
    ],
    "boxes": [{"id": BOX_ID, "name": "Ubuntu box", "template": "tpl-bench"}],
}


class StackError(Exception):
    pass


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise StackError(f"{self.name} exited with code {self.popen.returncode}:\n{self.tail()}")


@dataclass
class Stack:
    workdir: Path
    # Extra environment for the worker and the API (`--env KEY=VALUE`), e.g. a product setting to compare.
    extra_env: dict[str, str] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)
    temporal_port: int = 0
    pve_port: int = 0
    control_port: int = 0
    api_port: int = 0

    # ------------------------------------------------------------------ processes

    def start(self, name: str, command: list[str], env: dict[str, str] | None = None) -> Proc:
        log_path = self.workdir / f"{name}.log"
        with log_path.open("ab") as out:
            # A session of its own: a Ctrl-C on the terminal reaches only us, and we stop the children in order.
            popen = subprocess.Popen(
                command,
                cwd=ROOT,
                env=env or dict(os.environ),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        """SIGTERM every process this run started (newest first), SIGKILL what is still there after 10 s."""
        for proc in reversed(self.procs):
            if proc.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in reversed(self.procs):
            try:
                proc.popen.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.popen.wait(5)
        self.procs.clear()

    def get(self, name: str) -> Proc:
        return next(p for p in self.procs if p.name == name)

    def check_alive(self) -> None:
        for proc in self.procs:
            proc.check_alive()

    # ------------------------------------------------------------------ waiting

    def wait_port(self, proc: Proc, port: int, seconds: float = 60) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            proc.check_alive()
            with socket.socket() as sock:
                sock.settimeout(0.5)
                if sock.connect_ex((HOST, port)) == 0:
                    return
            time.sleep(0.1)
        raise StackError(f"{proc.name} did not listen on {HOST}:{port} within {seconds:.0f} s:\n{proc.tail()}")

    def wait_log(self, proc: Proc, text: str, seconds: float = 60) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            proc.check_alive()
            if text in proc.log_path.read_text(errors="replace"):
                return
            time.sleep(0.1)
        raise StackError(f"{proc.name} did not log {text!r} within {seconds:.0f} s:\n{proc.tail()}")

    # ------------------------------------------------------------------ the stack

    @property
    def temporal_address(self) -> str:
        return f"{HOST}:{self.temporal_port}"

    @property
    def api_url(self) -> str:
        return f"http://{HOST}:{self.api_port}"

    @property
    def control_url(self) -> str:
        return f"http://{HOST}:{self.control_port}"

    @property
    def ca_file(self) -> Path:
        return self.workdir / "fakepve-ca.pem"

    def app_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PVE_", "TEMPORAL_", "DATABASE_"))}
        env.update(
            DATABASE_URL=f"sqlite:///{self.workdir / 'app.db'}",
            TEMPORAL_ADDRESS=self.temporal_address,
            TEMPORAL_NAMESPACE="default",
            TEMPORAL_TASK_QUEUE=TASK_QUEUE,
            PVE_HOST=HOST,
            PVE_PORT=str(self.pve_port),
            PVE_USER="root@pam",
            PVE_PASSWORD="secret",
            PVE_VERIFY_SSL="true",
            PVE_CA_FILE=str(self.ca_file),
        )
        env.update(self.extra_env)
        return env

    def start_all(self) -> None:
        self.temporal_port, ui_port = free_port(), free_port()
        self.pve_port, self.control_port, self.api_port = free_port(), free_port(), free_port()
        log(f"work directory {self.workdir}")
        log(f"starting Temporal dev server on {self.temporal_address} (file-backed)")
        temporal = self.start(
            "temporal",
            [
                str(BIN / "temporal"),
                "server",
                "start-dev",
                "--db-filename",
                str(self.workdir / "temporal.db"),
                "--ip",
                HOST,
                "--port",
                str(self.temporal_port),
                "--ui-port",
                str(ui_port),
                "--log-level",
                "warn",
            ],
        )
        log(f"starting fakepve on {HOST}:{self.pve_port} (control {self.control_url})")
        fakepve = self.start(
            "fakepve",
            [
                sys.executable,
                "-m",
                "bench.fakepve_runner",
                "--host",
                HOST,
                "--port",
                str(self.pve_port),
                "--control-port",
                str(self.control_port),
                "--ca-out",
                str(self.ca_file),
                "--time-scale",
                "1",
                "--ceph-slow",
                "2",
            ],
        )
        self.wait_port(temporal, self.temporal_port)
        self.wait_port(fakepve, self.control_port)

        env = self.app_env()
        admin = self.workdir / "bench-admin.json"
        admin.write_text(json.dumps(ADMIN_DATA, indent=2))
        log("loading admin data (boxctl load)")
        loaded = subprocess.run(
            [str(BIN / "boxctl"), "load", str(admin)], cwd=ROOT, env=env, capture_output=True, text=True
        )
        if loaded.returncode != 0:
            raise StackError(f"boxctl load failed:\n{loaded.stdout}{loaded.stderr}")

        log("starting the worker (python worker.py), the API (uvicorn api.app:app) and the baseline worker")
        worker = self.start("worker", [sys.executable, "worker.py"], env)
        api = self.start(
            "api", [str(BIN / "uvicorn"), "api.app:app", "--host", HOST, "--port", str(self.api_port)], env
        )
        baseline = self.start(
            "baseline",
            [
                sys.executable,
                "-m",
                "bench.baseline",
                "--address",
                self.temporal_address,
                "--task-queue",
                BASELINE_QUEUE,
            ],
        )
        self.wait_log(worker, WORKER_READY)
        self.wait_port(api, self.api_port)
        self.wait_log(baseline, BASELINE_READY)
        log("stack is up")

    # ------------------------------------------------------------------ fakepve's side channel

    def pve_control(self, method: str, path: str, **params: Any) -> dict[str, Any]:
        answer = httpx.request(method, f"{self.control_url}{path}", params=params, timeout=60)
        answer.raise_for_status()
        return dict(answer.json())

    def pve_count(self, by_path: bool = False) -> dict[str, Any]:
        return self.pve_control("GET", "/count", **({"by": "path"} if by_path else {}))

    def pve_reset(self) -> None:
        self.pve_control("POST", "/reset")

    def pve_clone_seconds(self, secs: float, time_scale: float) -> None:
        self.pve_control("POST", "/slow", secs=secs)
        self.pve_control("POST", "/time-scale", value=time_scale)


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the harness dies without stopping us (SIGKILL, a crash)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


PR_SET_PDEATHSIG = 1


# ---------------------------------------------------------------------- /proc


def clock_ticks() -> int:
    return int(os.sysconf("SC_CLK_TCK"))


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process, in seconds (/proc/<pid>/stat utime + stime)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    # After the command name: state is field 3; utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / clock_ticks()


def rss_mb(pid: int) -> float:
    """Resident set size of a process in MB (/proc/<pid>/status VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise StackError(f"no VmRSS for process {pid}")
