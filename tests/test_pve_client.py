"""The PVE client honours the proxy settings of its environment (HTTPS_PROXY, NO_PROXY), read once at login."""

from __future__ import annotations

import select
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import SecretStr

from dev.stack import FAKEPVE_PASSWORD, FAKEPVE_USER
from pve.client import PveClient, PveUnavailable
from settings import Settings


def pve_settings(pve: Any, cafile: str) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        pve_host=pve.host,
        pve_port=pve.port,
        pve_user=FAKEPVE_USER,
        pve_password=SecretStr(FAKEPVE_PASSWORD),
        pve_ca_file=cafile,
    )


@pytest.fixture
def tunnel() -> Iterator[tuple[str, list[str]]]:
    """An HTTP CONNECT proxy on a free local port: its URL, and the targets it was asked to tunnel to."""
    listener = socket.create_server(("127.0.0.1", 0))
    asked: list[str] = []

    def pipe(client: socket.socket) -> None:
        with client:
            request = client.recv(65536).decode()
            target = request.split()[1]
            asked.append(target)
            host, port = target.rsplit(":", 1)
            with socket.create_connection((host, int(port))) as upstream:
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                while True:
                    ready, _, _ = select.select([client, upstream], [], [], 5)
                    if not ready:
                        return
                    for side in ready:
                        data = side.recv(65536)
                        if not data:
                            return
                        (upstream if side is client else client).sendall(data)

    def serve() -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=pipe, args=(client,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}", asked
    listener.close()


def test_requests_go_through_the_proxy_of_the_environment(
    pve: Any, fakepve_cafile: str, tunnel: tuple[str, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, asked = tunnel
    monkeypatch.setenv("HTTPS_PROXY", url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    client = PveClient(pve_settings(pve, fakepve_cafile))
    assert client.get("version")["version"]
    assert client.get("cluster/resources")
    # The login's request and the session's connection (kept alive for both calls), each through the proxy.
    assert len(asked) >= 2 and all(target == f"{pve.host}:{pve.port}" for target in asked)


def test_no_proxy_keeps_pve_off_the_proxy(pve: Any, fakepve_cafile: str, monkeypatch: pytest.MonkeyPatch) -> None:
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("NO_PROXY", pve.host)
    client = PveClient(pve_settings(pve, fakepve_cafile))
    assert client.get("version")["version"]
    # Without NO_PROXY, the same proxy (closed) is used, and PVE cannot be reached.
    monkeypatch.delenv("NO_PROXY")
    with pytest.raises(PveUnavailable):
        PveClient(pve_settings(pve, fakepve_cafile)).get("version")
