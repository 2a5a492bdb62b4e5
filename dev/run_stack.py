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
import sys
import time

import httpx

from dev.stack import HOST, ROOT, Stack, StackError, fakepve_settings, settings_env

VAR = ROOT / "var"
LOGS = VAR / "log"
TEMPORAL_PORT = int(os.environ.get("RUN_TEMPORAL_PORT", 7233))
UI_PORT = int(os.environ.get("RUN_UI_PORT", 8233))
PVE_PORT = int(os.environ.get("RUN_PVE_PORT", 8006))
API_PORT = int(os.environ.get("RUN_API_PORT", 8000))
DEMO_TOKEN = "demo-token-0123456789abcdefghijklmnop"
BOX_ID = "60d5ec49f1b2c8a1e4d3b2a1"


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


def app_env() -> dict[str, str]:
    """The worker's and the API's environment: this stack's Temporal and fakepve; DATABASE_URL and the other
    settings as the caller's environment (or .env) gives them."""
    database_url = os.environ.get("DATABASE_URL", f"sqlite:///{VAR / 'app.db'}")
    return settings_env(fakepve_settings(database_url, TEMPORAL_PORT, PVE_PORT, VAR / "fakepve-ca.pem"))


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
    # The demo box starts its VM and waits for the guest agent to report its address.
    addresses = state.get("ip_addresses")
    shown = ", ".join(map(str, addresses)) if isinstance(addresses, list) and addresses else "none reported"
    print(f"\nVM {state.get('vmid')} is running; its address, as its guest agent reports it: {shown}")


def main() -> int:
    LOGS.mkdir(parents=True, exist_ok=True)
    env = app_env()
    metrics_port = int(env["WORKER_METRICS_PORT"])  # 9464 unless the environment (or .env) says otherwise; 0: off
    ports = {"Temporal": TEMPORAL_PORT, "Temporal Web UI": UI_PORT, "fakepve (PVE API)": PVE_PORT, "REST API": API_PORT}
    if metrics_port:
        ports["worker metrics"] = metrics_port
    taken = [f"  {name}: {HOST}:{port}" for name, port in ports.items() if port_taken(port)]
    if taken:
        print(
            "make run: these ports are already in use; stop what uses them (perhaps another `make run`),\n"
            "or choose others with RUN_TEMPORAL_PORT, RUN_UI_PORT, RUN_PVE_PORT, RUN_API_PORT,\n"
            "WORKER_METRICS_PORT (0: no worker metrics):\n" + "\n".join(taken),
            file=sys.stderr,
        )
        return 1

    stack = Stack(LOGS)
    stop_requested = False

    def request_stop(_signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        print(f"Starting Temporal (file-backed: {VAR / 'temporal.db'}) ...")
        temporal = stack.temporal(VAR / "temporal.db", TEMPORAL_PORT, UI_PORT)
        print("Starting fakepve (nodes pve1 and pve2, shared storage NFS, template VM 9000) ...")
        pve = stack.fakepve("dev.fakepve_server", PVE_PORT, VAR / "fakepve-ca.pem")
        temporal.wait_ready()
        pve.wait_ready()

        print("Loading the demo data (dev/demo.json) ...")
        stack.prepare_database(env, ROOT / "dev" / "demo.json")

        print("Starting the worker and the API ...")
        worker, api_process = stack.worker(env, own_metrics_port=True), stack.api(env, API_PORT)
        worker.wait_ready()
        api_process.wait_ready()
        api = f"http://{HOST}:{API_PORT}"
        demo_request(api)
        worker_metrics = f", http://{HOST}:{metrics_port}/metrics (worker)" if metrics_port else ""

        print(
            f"""
The stack is up (logs in {LOGS}):
  REST API docs     {api}/docs
  Temporal Web UI   http://localhost:{UI_PORT}
  Metrics           {api}/metrics (API){worker_metrics}
  Admin CLI         PVE_USER=root@pam PVE_PASSWORD=secret PVE_CA_FILE=var/fakepve-ca.pem .venv/bin/boxctl reconcile
  Try it:
    curl -s -X POST {api}/api/v1/vm/manage/createFromBoxTemplate \\
      -H 'Authorization: Bearer {DEMO_TOKEN}' -H 'Content-Type: application/json' \\
      -d '{{"box_id": "{BOX_ID}", "name": "my-vm", "target": "pve2",
           "cpuCores": 2, "memorySize": 2048, "diskSize": 20}}'
Press Ctrl-C to stop everything.""",
            flush=True,
        )
        while not stop_requested:
            stack.check_alive()
            time.sleep(0.5)
        print("\nStopping ...")
        return 0
    except (StackError, httpx.HTTPError) as exc:
        print(f"make run: {exc}", file=sys.stderr)
        return 1
    finally:
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
