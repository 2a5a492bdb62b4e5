"""fakepve for the benchmarks, as a process of its own, with a plain-HTTP side channel to steer and count it.

python -m bench.fakepve_runner --port 8006 --control-port 8007 --ca-out /tmp/ca.pem [--time-scale 1] [--ceph-slow 2]

The cluster is dev/fakepve_cluster.py's (nodes pve1 and pve2, shared NFS, template VM 9000) plus a third node
pve3 (a lab spreads over three nodes) and a shared RBD storage `ceph` whose operations take `ceph_slow` extra PVE
seconds: a clone onto `ceph` takes that long.

Side channel (http://host:control-port):
  GET  /count[?by=path]           {"total": n, "by": {"GET nodes/{node}/tasks/{upid}/status": n, ...}}
  POST /reset                     forget the requests counted so far
  POST /slow?secs=N               a clone onto `ceph` now takes N PVE seconds
  POST /time-scale?value=X        real seconds per PVE second (0: tasks end before their request answers)
  GET  /tasks                     {"running": n}: PVE tasks not yet ended

fakepve is AGPL: it runs only as this separate process, never imported by the product.
"""

from __future__ import annotations

import argparse
import asyncio
import re
from collections import Counter
from typing import Any

from aiohttp import web

from dev.fakepve_server import arguments, make_fake, run, start

CEPH = "ceph"
THIRD_NODE = "pve3"
PREFIX = re.compile(r"^/api2/(json|extjs)/")
NODE = re.compile(r"(^|/)nodes/[^/]+")
VMID = re.compile(r"/(qemu|lxc)/\d+")
UPID = re.compile(r"/tasks/UPID:[^/]+")


def path_kind(method: str, path: str) -> str:
    """`GET /api2/json/nodes/pve1/tasks/UPID:.../status` -> `GET nodes/{node}/tasks/{upid}/status`."""
    path = PREFIX.sub("", path)
    path = NODE.sub(r"\1nodes/{node}", path)
    path = VMID.sub(r"/\1/{vmid}", path)
    path = UPID.sub("/tasks/{upid}", path)
    return f"{method} {path}"


def control_app(pve: Any) -> web.Application:
    async def count(request: web.Request) -> web.Response:
        answer: dict[str, Any] = {"total": len(pve.requests)}
        if request.query.get("by") == "path":
            answer["by"] = dict(Counter(path_kind(method, path) for method, path, _body in pve.requests))
        return web.json_response(answer)

    async def reset(_request: web.Request) -> web.Response:
        pve.requests.clear()
        return web.json_response({"total": 0})

    async def slow(request: web.Request) -> web.Response:
        secs = float(request.query["secs"])
        if secs:
            pve.ceph_slow(secs)
        else:
            pve.ceph_recover()
        return web.json_response({"ceph_slow": secs})

    async def time_scale(request: web.Request) -> web.Response:
        pve.time_scale = float(request.query["value"])
        return web.json_response({"time_scale": pve.time_scale})

    async def tasks(_request: web.Request) -> web.Response:
        running = sum(1 for task in pve.tasks.values() if task.get("status") == "running")
        return web.json_response({"running": running, "vms": len(pve.vms)})

    app = web.Application()
    app.router.add_get("/count", count)
    app.router.add_post("/reset", reset)
    app.router.add_post("/slow", slow)
    app.router.add_post("/time-scale", time_scale)
    app.router.add_get("/tasks", tasks)
    return app


async def serve(args: argparse.Namespace) -> None:
    pve = make_fake(args)
    # The default (10000) would drop requests while the benchmark counts them.
    pve.max_requests = 10**7
    pve.add_node(THIRD_NODE)
    pve.add_ceph_storage(CEPH)
    if args.ceph_slow:
        pve.ceph_slow(args.ceph_slow)
    await start(pve, args.ca_out)
    runner = web.AppRunner(control_app(pve), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.control_port).start()
    print(f"fakepve listening on {pve.url}, control on http://{args.host}:{args.control_port}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = arguments(__doc__.splitlines()[0], time_scale=1.0)
    parser.add_argument("--control-port", type=int, required=True)
    parser.add_argument("--ceph-slow", type=float, default=2.0, help="PVE seconds a clone onto `ceph` takes")
    run(serve, parser.parse_args())


if __name__ == "__main__":
    main()
