"""The stack's processes, started as an operator starts them: for `make run`, the benchmark and the tests.

A file-backed Temporal dev server, fakepve (a dev/ or bench/ runner module, as a process of its own: fakepve
is AGPL and the product never imports it), the worker (`python worker.py`) and the API (uvicorn). Each
process gets its environment from a Settings, its output in `<logs>/<name>.log`, a session of its own (a
Ctrl-C on the terminal reaches only the caller, which then stops them) and a way to say it is ready.
`Stack.stop` ends everything a stack started, whatever happened; a process can be SIGKILLed and started
again (the tests' crashes and restarts).
"""

from __future__ import annotations

import asyncio
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

from pydantic import SecretStr

from settings import Settings

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
# The fake's login; dev/fakepve_server.py serves it, every process of the stack logs in with it.
FAKEPVE_USER = "root@pam"
FAKEPVE_PASSWORD = "secret"
# What worker.py logs once it is connected and polls its task queue.
WORKER_READY = "worker polling task queue"


class StackError(Exception):
    """A process of the stack did not start, did not become ready, or died."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


def fakepve_settings(database_url: str, temporal_port: int, pve_port: int, ca_file: Path, **more: Any) -> Settings:
    """Settings of a worker or API on a stack's Temporal and fakepve (password login, certificate verified).

    Fields not given here come from the environment and `.env`, as in the processes themselves."""
    values: dict[str, Any] = {
        "database_url": database_url,
        "temporal_address": f"{HOST}:{temporal_port}",
        "pve_host": HOST,
        "pve_port": pve_port,
        "pve_user": FAKEPVE_USER,
        "pve_password": FAKEPVE_PASSWORD,
        "pve_token_name": "",
        "pve_token_value": "",
        "pve_verify_ssl": True,
        "pve_ca_file": str(ca_file),
        # The dev server speaks plain TCP: no TLS or API key of a production .env.
        "temporal_tls_cert": "",
        "temporal_tls_key": "",
        "temporal_tls_ca": "",
        "temporal_api_key": "",
    }
    return Settings(**{**values, **more})


def settings_env(settings: Settings, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment under which a process reads exactly `settings` (then `extra` on top).

    Every field is written, so neither the caller's own variables nor a `.env` file can change what the
    child reads; a field added to Settings is passed on without a change here."""
    names = {name.upper() for name in Settings.model_fields}
    env = {key: value for key, value in os.environ.items() if key.upper() not in names}
    values = settings.model_dump(mode="json")
    # The JSON dump masks secrets ("**********"); the child needs the real ones.
    values.update({name: value.get_secret_value() for name, value in settings if isinstance(value, SecretStr)})
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):
            env[name.upper()] = "true" if value else "false"
        elif isinstance(value, str | int | float):
            env[name.upper()] = str(value)
        else:  # lists and dicts: pydantic-settings reads complex values as JSON
            env[name.upper()] = json.dumps(value)
    env.update(extra or {})
    return env


@dataclass
class Proc:
    """One process of a stack. `start` after `stop` or `kill` starts the same command again."""

    name: str
    command: list[str]
    env: dict[str, str]
    log_path: Path
    ready_port: int | None = None  # ready once something listens there
    ready_log: str | None = None  # ready once the log holds this text
    grace: float = 10  # seconds between SIGTERM and SIGKILL
    popen: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _log_offset: int = field(default=0, init=False, repr=False)

    def start(self) -> Proc:
        # The parent's handle is closed at once; the child keeps the log open.
        with self.log_path.open("ab") as out:
            self._log_offset = out.tell()
            self.popen = subprocess.Popen(
                self.command,
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.popen, f"{self.name} was never started"
        return self.popen.pid

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.ready_port}"

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def check_alive(self) -> None:
        if self.popen is not None and self.popen.poll() is not None:
            raise StackError(
                f"{self.name} exited with code {self.popen.returncode}; see {self.log_path}:\n{self.tail()}"
            )

    def is_ready(self) -> bool:
        if self.ready_port is not None and not listening(self.ready_port):
            return False
        if self.ready_log is not None:
            # Only what this start logged: a restarted process appends to the log of its earlier life.
            with self.log_path.open("rb") as log:
                log.seek(self._log_offset)
                return self.ready_log.encode() in log.read()
        return True

    def wait_ready(self, seconds: float = 60) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.check_alive()
            if self.is_ready():
                return
            time.sleep(0.1)
        waited = f"listen on {HOST}:{self.ready_port}" if self.ready_port is not None else f"log {self.ready_log!r}"
        raise StackError(f"{self.name} did not {waited} within {seconds:.0f} s; see {self.log_path}:\n{self.tail()}")

    async def ready(self, seconds: float = 60) -> None:
        """`wait_ready` for async callers, off their event loop."""
        await asyncio.to_thread(self.wait_ready, seconds)

    def _signal(self, signum: int) -> None:
        # The whole session: whatever the process started goes with it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signum)

    def kill(self) -> None:
        """SIGKILL: no chance to finish anything (a crash)."""
        if self.alive():
            self._signal(signal.SIGKILL)
        if self.popen:
            self.popen.wait(10)

    def terminate(self) -> None:
        if self.alive():
            self._signal(signal.SIGTERM)

    def reap(self, deadline: float) -> None:
        """Wait for the process to end until `deadline` (monotonic), then SIGKILL it."""
        if self.popen is None:
            return
        try:
            self.popen.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            self.kill()

    def stop(self) -> None:
        """SIGTERM, and SIGKILL after `grace` seconds."""
        self.terminate()
        self.reap(time.monotonic() + self.grace)


@dataclass
class Stack:
    """The processes one caller started, their logs in `logs`."""

    logs: Path
    procs: list[Proc] = field(default_factory=list)

    def spawn(
        self,
        name: str,
        command: list[str],
        env: dict[str, str] | None = None,
        *,
        ready_port: int | None = None,
        ready_log: str | None = None,
        grace: float = 10,
    ) -> Proc:
        self.logs.mkdir(parents=True, exist_ok=True)
        proc = Proc(name, command, env or dict(os.environ), self.logs / f"{name}.log", ready_port, ready_log, grace)
        self.procs.append(proc)
        return proc.start()

    def temporal(self, db_file: Path, port: int, ui_port: int | None = None, log_level: str = "warn") -> Proc:
        """A file-backed Temporal dev server (its runs survive a restart); without `ui_port`, no Web UI."""
        ui = ["--ui-port", str(ui_port)] if ui_port else ["--headless"]
        command = [str(BIN / "temporal"), "server", "start-dev", "--db-filename", str(db_file)]
        command += ["--ip", HOST, "--port", str(port), *ui, "--log-level", log_level]
        # Time to write its database out before SIGKILL.
        return self.spawn("temporal", command, ready_port=port, grace=20)

    def fakepve(self, module: str, port: int, ca_out: Path, *args: str, ready_port: int | None = None) -> Proc:
        """fakepve served by `module` (dev.fakepve_server or bench.fakepve_runner), its CA written to `ca_out`."""
        command = [sys.executable, "-m", module, "--host", HOST, "--port", str(port), "--ca-out", str(ca_out)]
        command += ["--user", FAKEPVE_USER, "--password", FAKEPVE_PASSWORD, *args]
        return self.spawn("fakepve", command, ready_port=ready_port or port)

    def worker(self, env: dict[str, str], name: str = "worker", own_metrics_port: bool = False) -> Proc:
        """A worker; its metrics (unless WORKER_METRICS_PORT is 0) on a free port, so that two workers of a stack
        never ask for the same one (a worker whose port is taken refuses to start). `own_metrics_port`: on
        WORKER_METRICS_PORT itself, as `make run`'s one worker, where an operator looks for them."""
        if env.get("WORKER_METRICS_PORT", "0") != "0" and not own_metrics_port:
            env = {**env, "WORKER_METRICS_PORT": str(free_port())}
        return self.spawn(name, [sys.executable, "worker.py"], env, ready_log=WORKER_READY)

    def api(self, env: dict[str, str], port: int, name: str = "api") -> Proc:
        # uvicorn binds its port only once the app's lifespan has started: listening means ready.
        command = [sys.executable, "-m", "uvicorn", "api.app:app", "--host", HOST, "--port", str(port)]
        return self.spawn(name, command, env, ready_port=port)

    def boxctl(self, env: dict[str, str], *args: str, quiet: bool = False) -> None:
        """Run `boxctl ARGS` to its end; its output goes to the terminal, or (quiet) only into the error."""
        done = subprocess.run(
            [str(BIN / "boxctl"), *args], cwd=ROOT, env=env, capture_output=quiet, text=True, check=False
        )
        if done.returncode != 0:
            output = (done.stdout or "") + (done.stderr or "")
            raise StackError(f"boxctl {' '.join(args)} failed with code {done.returncode}\n{output}".rstrip())

    def prepare_database(self, env: dict[str, str], admin_file: Path, quiet: bool = False) -> None:
        """Bring the database to the current schema and load the admin data: before the worker and the API,
        which refuse a database that is not at the current schema."""
        self.boxctl(env, "db", "upgrade", quiet=quiet)
        self.boxctl(env, "load", str(admin_file), quiet=quiet)

    def get(self, name: str) -> Proc:
        return next(proc for proc in self.procs if proc.name == name)

    def check_alive(self) -> None:
        for proc in self.procs:
            proc.check_alive()

    def stop(self) -> None:
        """SIGTERM every process at once (newest first), then SIGKILL each one still there after its grace."""
        now = time.monotonic()
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in reversed(self.procs):
            proc.reap(now + proc.grace)


def _libc_prctl() -> Any:
    with contextlib.suppress(OSError, AttributeError):
        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    return None


# Looked up here, not in the child: between fork and exec, with the caller's other threads frozen wherever
# they were, the child does as little as it can.
_PRCTL = _libc_prctl()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the caller dies without stopping us (SIGKILL, a crash).

    Linux sends it when the *thread* that started the child ends: start processes from a thread that lives
    as long as they do (the main thread), never from a pool thread."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)
