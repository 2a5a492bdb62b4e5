"""`make run`: the whole stack on embedded defaults, one real request through it, then up until Ctrl-C.

Starts a file-backed Temporal dev server (Web UI included), fakepve as the PVE, the worker and the API;
loads the demo data; sends one createFromBoxTemplate request over HTTP and prints the answer and the final
task state. Everything it keeps lives in var/, so a second `make run` picks up where the first stopped.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
VAR = ROOT / "var"
LOGS = VAR / "log"
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
TEMPORAL_PORT = int(os.environ.get("RUN_TEMPORAL_PORT", 7233))
UI_PORT = int(os.environ.get("RUN_UI_PORT", 8233))
PVE_PORT = int(os.environ.get("RUN_PVE_PORT", 8006))
API_PORT = int(os.environ.get("RUN_API_PORT", 8000))
DEMO_TOKEN = "demo-token-0123456789abcdefghijklmnop"
BOX_ID = "60d5ec49f1b2c8a1e4d3b2a1"


class StackError(Exception):
    pass


def port_taken(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        if sock.connect_ex((HOST, port)) == 0:
            return True
    with socket.socket() as sock:
        # As the servers themselves bind: a port left in TIME_WAIT by the last run is free to use.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return True
    return False


def wait_for_port(name: str, port: int, process: subprocess.Popen[bytes], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise StackError(f"{name} exited with code {process.returncode}; see {LOGS / (name + '.log')}")
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.2)
    raise StackError(f"{name} did not listen on {HOST}:{port} within {seconds:.0f} s; see {LOGS / (name + '.log')}")


class Stack:
    def __init__(self) -> None:
        self.processes: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = (LOGS / f"{name}.log").open("ab")
        # A process group of its own: Ctrl-C reaches us once, and we stop the children in order.
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.processes.append((name, process))
        return process

    def stop(self) -> None:
        for _name, process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for _name, process in reversed(self.processes):
            try:
                process.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                process.kill()

    def first_dead(self) -> str | None:
        for name, process in self.processes:
            if process.poll() is not None:
                return f"{name} exited with code {process.returncode}; see {LOGS / (name + '.log')}"
        return None


def app_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("DATABASE_URL", f"sqlite:///{VAR / 'app.db'}")
    env.update(
        TEMPORAL_ADDRESS=f"{HOST}:{TEMPORAL_PORT}",
        PVE_HOST=HOST,
        PVE_PORT=str(PVE_PORT),
        PVE_USER="root@pam",
        PVE_PASSWORD="secret",
        PVE_VERIFY_SSL="true",
        PVE_CA_FILE=str(VAR / "fakepve-ca.pem"),
    )
    env.pop("PVE_TOKEN_NAME", None)
    env.pop("PVE_TOKEN_VALUE", None)
    return env


def demo_request(api: str) -> None:
    headers = {"Authorization": f"Bearer {DEMO_TOKEN}"}
    request = {
        "box_id": BOX_ID,
        "name": f"demo-{int(time.time())}",
        "target": "pve2",
        "cpuCores": 2,
        "memorySize": 2048,
        "diskSize": 20,
    }
    print(f"\n$ POST {api}/api/v1/vm/manage/createFromBoxTemplate\n  {json.dumps(request)}")
    started = time.monotonic()
    answer = httpx.post(f"{api}/api/v1/vm/manage/createFromBoxTemplate", json=request, headers=headers, timeout=60)
    print(f"{answer.status_code} in {time.monotonic() - started:.2f} s\n{json.dumps(answer.json(), indent=2)}")
    if answer.status_code != 200:
        raise StackError("the demo request was not admitted")
    task_id = answer.json()["data"]["task_id"]
    state: dict[str, object] = {}
    while time.monotonic() - started < 120:
        state = httpx.get(f"{api}/api/v1/vm/manage/tasks/{task_id}", headers=headers, timeout=10).json()["data"]
        if state["status"] != "running":
            break
        time.sleep(0.25)
    print(f"\n$ GET {api}/api/v1/vm/manage/tasks/{task_id}   (ended after {time.monotonic() - started:.2f} s)")
    print(json.dumps(state, indent=2))


def main() -> int:
    LOGS.mkdir(parents=True, exist_ok=True)
    ports = {"Temporal": TEMPORAL_PORT, "Temporal Web UI": UI_PORT, "fakepve (PVE API)": PVE_PORT, "REST API": API_PORT}
    taken = [f"  {name}: {HOST}:{port}" for name, port in ports.items() if port_taken(port)]
    if taken:
        print(
            "make run: these ports are already in use; stop what uses them (perhaps another `make run`),\n"
            "or choose others with RUN_TEMPORAL_PORT, RUN_UI_PORT, RUN_PVE_PORT, RUN_API_PORT:\n" + "\n".join(taken),
            file=sys.stderr,
        )
        return 1

    stack = Stack()
    env = app_env()
    stop_requested = False

    def request_stop(_signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        print(f"Starting Temporal (file-backed: {VAR / 'temporal.db'}) ...")
        temporal = stack.start(
            "temporal",
            [
                str(BIN / "temporal"),
                "server",
                "start-dev",
                "--db-filename",
                str(VAR / "temporal.db"),
                "--ip",
                HOST,
                "--port",
                str(TEMPORAL_PORT),
                "--ui-port",
                str(UI_PORT),
                "--log-level",
                "warn",
            ],
            env,
        )
        print("Starting fakepve (nodes pve1 and pve2, shared storage NFS, template VM 9000) ...")
        pve = stack.start(
            "fakepve",
            [
                sys.executable,
                "-m",
                "dev.fakepve_server",
                "--host",
                HOST,
                "--port",
                str(PVE_PORT),
                "--ca-out",
                str(VAR / "fakepve-ca.pem"),
            ],
            env,
        )
        wait_for_port("temporal", TEMPORAL_PORT, temporal)
        wait_for_port("fakepve", PVE_PORT, pve)

        print("Loading the demo data (dev/demo.json) ...")
        subprocess.run([str(BIN / "boxctl"), "load", str(ROOT / "dev" / "demo.json")], cwd=ROOT, env=env, check=True)

        print("Starting the worker and the API ...")
        stack.start("worker", [sys.executable, "worker.py"], env)
        api_process = stack.start(
            "api", [str(BIN / "uvicorn"), "api.app:app", "--host", HOST, "--port", str(API_PORT)], env
        )
        wait_for_port("api", API_PORT, api_process)
        api = f"http://{HOST}:{API_PORT}"
        demo_request(api)

        print(
            f"""
The stack is up (logs in {LOGS}):
  REST API docs     {api}/docs
  Temporal Web UI   http://localhost:{UI_PORT}
  Admin CLI         PVE_PASSWORD=secret PVE_CA_FILE=var/fakepve-ca.pem .venv/bin/boxctl reconcile
  Try it:
    curl -s -X POST {api}/api/v1/vm/manage/createFromBoxTemplate \\
      -H 'Authorization: Bearer {DEMO_TOKEN}' -H 'Content-Type: application/json' \\
      -d '{{"box_id": "{BOX_ID}", "name": "my-vm", "target": "pve2",
           "cpuCores": 2, "memorySize": 2048, "diskSize": 20}}'
Press Ctrl-C to stop everything.""",
            flush=True,
        )
        while not stop_requested:
            dead = stack.first_dead()
            if dead:
                raise StackError(dead)
            time.sleep(0.5)
        print("\nStopping ...")
        return 0
    except (StackError, subprocess.CalledProcessError, httpx.HTTPError) as exc:
        print(f"make run: {exc}", file=sys.stderr)
        return 1
    finally:
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
