"""Serve the fake cluster of dev/fakepve_cluster.py over HTTPS, as `make run`'s PVE.

python -m dev.fakepve_server --host 127.0.0.1 --port 8006 --ca-out var/fakepve-ca.pem
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import Callable, Coroutine
from typing import Any

from fakepve import FakePve
from fakepve.certs import make_cert

from dev.fakepve_cluster import seed


def make_fake(args: argparse.Namespace) -> FakePve:
    """The seeded fake cluster, not yet listening."""
    pve = FakePve(user=args.user, password=args.password, host=args.host, port=args.port)
    pve.time_scale = args.time_scale
    seed(pve, boot_seconds=args.guest_boot_seconds)
    return pve


async def start(pve: FakePve, ca_out: str) -> None:
    """Listen over HTTPS with a fresh certificate, written to ca_out for the clients to verify it with."""
    tmp = tempfile.mkdtemp(prefix="fakepve-")
    try:
        certfile, keyfile, _ = make_cert(tmp, hosts=(pve.host,))
        # The certificate is its own CA: clients verify PVE with it (PVE_CA_FILE).
        shutil.copyfile(certfile, ca_out)
        await pve.start(certfile, keyfile)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def serve(args: argparse.Namespace) -> None:
    pve = make_fake(args)
    await start(pve, args.ca_out)
    print(f"fakepve listening on {pve.url}", flush=True)
    await asyncio.Event().wait()


def arguments(description: str, time_scale: float) -> argparse.ArgumentParser:
    """The options every fakepve runner takes (this one's and bench/fakepve_runner.py's)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8006)
    parser.add_argument("--user", default="root@pam")
    parser.add_argument("--password", default="secret")
    parser.add_argument("--time-scale", type=float, default=time_scale, help="real seconds per PVE second")
    parser.add_argument("--ca-out", required=True, help="where to write the CA certificate clients verify with")
    parser.add_argument(
        "--guest-boot-seconds",
        type=float,
        default=1.0,
        help="real seconds from a VM's start until its guest agent answers (and reports its address)",
    )
    return parser


def run(serve: Callable[[argparse.Namespace], Coroutine[Any, Any, None]], args: argparse.Namespace) -> None:
    """Serve until the process is stopped; Ctrl-C ends it without a traceback."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args))


def main() -> None:
    run(serve, arguments(__doc__.splitlines()[0], time_scale=0.05).parse_args())


if __name__ == "__main__":
    main()
