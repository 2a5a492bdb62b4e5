"""The benchmark's stack: dev/stack.py's processes on free ports, state and logs in one temporary directory.

Temporal (file-backed dev server), fakepve (bench/fakepve_runner.py, with its side channel that steers and
counts it), the product's worker and API, and the baseline worker (bench/baseline.py).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

# BIN and ROOT are re-exported: bench/report.py finds the project and its tools through this module.
from dev.stack import BIN as BIN
from dev.stack import HOST, Stack, StackError, fakepve_settings, free_port, settings_env
from dev.stack import ROOT as ROOT

TASK_QUEUE = "bench-vm-manage"
BASELINE_QUEUE = "bench-baseline"
TOKEN = "bench-token-0123456789abcdefghijklmnopqrstuv"
USER = "bench"
BOX_ID = "bench-box-ubuntu"
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


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class BenchStack(Stack):
    # Extra environment for the worker and the API (`--env KEY=VALUE`), e.g. a product setting to compare.
    extra_env: dict[str, str] = field(default_factory=dict)
    temporal_port: int = 0
    pve_port: int = 0
    control_port: int = 0
    api_port: int = 0

    @property
    def workdir(self) -> Path:
        return self.logs

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
        database_url = f"sqlite:///{self.workdir / 'app.db'}"
        settings = fakepve_settings(
            database_url,
            self.temporal_port,
            self.pve_port,
            self.ca_file,
            temporal_namespace="default",
            temporal_task_queue=TASK_QUEUE,
            # The load generator sends far more than a client would: measure the service, not the limit.
            rate_limit_per_minute=0,
        )
        return settings_env(settings, self.extra_env)

    def start_all(self) -> None:
        self.temporal_port, self.pve_port = free_port(), free_port()
        self.control_port, self.api_port = free_port(), free_port()
        log(f"work directory {self.workdir}")
        log(f"starting Temporal dev server on {self.temporal_address} (file-backed)")
        temporal = self.temporal(self.workdir / "temporal.db", self.temporal_port, ui_port=free_port())
        log(f"starting fakepve on {HOST}:{self.pve_port} (control {self.control_url})")
        control = ["--control-port", str(self.control_port), "--time-scale", "1", "--ceph-slow", "2"]
        # The side channel listens once the PVE API does.
        fakepve = self.fakepve(
            "bench.fakepve_runner", self.pve_port, self.ca_file, *control, ready_port=self.control_port
        )
        temporal.wait_ready()
        fakepve.wait_ready()

        env = self.app_env()
        admin = self.workdir / "bench-admin.json"
        admin.write_text(json.dumps(ADMIN_DATA, indent=2))
        log("preparing the database (boxctl db upgrade, boxctl load)")
        self.prepare_database(env, admin, quiet=True)

        log("starting the worker (python worker.py), the API (uvicorn api.app:app) and the baseline worker")
        baseline = [sys.executable, "-m", "bench.baseline", "--address", self.temporal_address]
        baseline += ["--pve-host", HOST, "--pve-port", str(self.pve_port), "--pve-ca", str(self.ca_file)]
        baseline += ["--db", str(self.workdir / "baseline.db")]
        started = [
            self.worker(env),
            self.api(env, self.api_port),
            self.spawn("baseline", [*baseline, "--task-queue", BASELINE_QUEUE], ready_log=BASELINE_READY),
        ]
        for proc in started:
            proc.wait_ready()
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
