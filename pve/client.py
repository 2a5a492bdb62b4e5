"""One PVE API connection per process: lazy login, a fresh ticket when PVE rejects the old one, and the line
between PVE errors worth retrying and those that are final."""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from typing import Any

import requests
from proxmoxer import ProxmoxAPI, ResourceException
from proxmoxer.backends.https import AuthenticationError

from settings import Settings

# Statuses PVE (or its proxy) answers while a node, the cluster or the network is in trouble:
# 595-599 are pveproxy's "could not reach the node".
TRANSIENT_STATUSES = {408, 429, 502, 503, 504, 595, 596, 597, 598, 599}
# PVE answers 500 for nearly everything; these messages mean "try again later", not "this is wrong". A write
# whose `digest` no longer matches (the config changed since it was read: "file changed by other user? Try
# again", or "checksum mismatch (file change by other user?)") is tried again from the read.
TRANSIENT_MESSAGES = re.compile(
    r"got timeout|no quorum|cluster not ready|temporarily|timeout|connection refused|connection reset"
    r"|no route to host|is not online|try again|is locked|file changed? by other user",
    re.IGNORECASE,
)


class PveError(Exception):
    """A PVE answer that retrying will not change (bad parameter, missing VM, permission, ...)."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status} {message}")
        self.status = status
        self.message = message


def any_refusal(_exc: PveError) -> bool:
    """For PveClient.get_expecting: a read any refusal of which is an answer (the guest agent before boot)."""
    return True


class PveUnavailable(Exception):
    """PVE could not be reached or said to try again; retry with backoff."""


def classify(exc: ResourceException) -> Exception:
    message = str(exc.content or exc.status_message or "")
    if exc.errors:
        message = f"{message} {exc.errors}"
    if exc.status_code in TRANSIENT_STATUSES or (exc.status_code >= 500 and TRANSIENT_MESSAGES.search(message)):
        return PveUnavailable(f"{exc.status_code} {message}")
    return PveError(exc.status_code, message)


def environment_ca_bundle(verify: bool | str) -> bool | str:
    """The CA bundle requests would take from the environment for `verify=True` (REQUESTS_CA_BUNDLE, then
    CURL_CA_BUNDLE), read once: environment_read_once stops requests from reading it per request."""
    if verify is True:
        return os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
    return verify


def environment_read_once(api: ProxmoxAPI) -> None:
    """requests reads the proxy settings from the environment (and matches NO_PROXY) anew for every request: a
    fifth of the CPU each PVE call takes (measured with py-spy on the worker). They are read once, at login,
    for PVE's address; the CA bundle is environment_ca_bundle's. proxmoxer passes its own auth (no .netrc)."""
    session = api._store["session"]
    session.proxies.update(requests.utils.get_environ_proxies(api._store["base_url"]))
    session.trust_env = False


class PveClient:
    """Thread-safe enough for activities on a thread pool: requests' connection pool is shared, and a
    re-login swaps the whole ProxmoxAPI object under a lock."""

    def __init__(self, settings: Settings, on_error: Callable[[str], None] | None = None):
        self._settings = settings
        # Told "transient" or "final" for each error a call raises: the worker counts them (a metric).
        self._on_error = on_error
        # At construction, not at the first call: a worker without PVE_USER refuses to start (SettingsError).
        self._user = settings.require_pve_user()
        self._lock = threading.Lock()
        self._api: ProxmoxAPI | None = None

    def _connect(self) -> ProxmoxAPI:
        s = self._settings
        auth: dict[str, Any]
        token_value = s.pve_token_value.get_secret_value()
        if s.pve_token_name and token_value:
            auth = {"token_name": s.pve_token_name, "token_value": token_value}
        else:
            auth = {"password": s.pve_password.get_secret_value()}
        try:
            api = ProxmoxAPI(
                s.pve_host,
                port=s.pve_port,
                user=self._user,
                verify_ssl=environment_ca_bundle(s.pve_verify),
                timeout=s.pve_timeout_seconds,
                **auth,
            )
        except AuthenticationError as exc:
            # Wrong credentials are final; PVE being down while we log in is not.
            if "code: 401" in str(exc):
                raise PveError(401, f"PVE login failed for {self._user}") from exc
            raise PveUnavailable(str(exc)) from exc
        except requests.RequestException as exc:
            raise PveUnavailable(f"PVE login: {exc}") from exc
        environment_read_once(api)
        return api

    def _current(self, stale: ProxmoxAPI | None = None) -> ProxmoxAPI:
        with self._lock:
            if self._api is None or self._api is stale:
                self._api = self._connect()
            return self._api

    def call(self, method: str, path: str, **params: Any) -> Any:
        """One API call; returns PVE's `data`. Raises PveError (final) or PveUnavailable (retry)."""
        return self._counted(method, path, None, params)

    def get_expecting(self, path: str, expected: Callable[[PveError], bool], **params: Any) -> Any:
        """A GET that PVE may refuse as the caller expects (`expected(error)`: a VM that no longer exists, the
        guest agent before the guest has booted). Such a refusal is raised as any other, but it is an answer, not
        a failure: the error metric does not count it."""
        return self._counted("get", path, expected, params)

    def _counted(
        self, method: str, path: str, expected: Callable[[PveError], bool] | None, params: dict[str, Any]
    ) -> Any:
        try:
            return self._call(method, path, **params)
        except PveError as exc:
            if expected is None or not expected(exc):
                self._count("final")
            raise
        except PveUnavailable:
            self._count("transient")
            raise

    def _count(self, kind: str) -> None:
        if self._on_error is not None:
            self._on_error(kind)

    def _call(self, method: str, path: str, **params: Any) -> Any:
        api = self._current()
        logged_in_again = asked_again = False
        while True:
            try:
                return getattr(api(path), method)(**params)
            except ResourceException as exc:
                if exc.status_code == 401 and not logged_in_again:
                    # The ticket expired or was revoked: log in again, once.
                    logged_in_again = True
                    api = self._current(stale=api)
                    continue
                raise classify(exc) from exc
            except AuthenticationError as exc:
                # proxmoxer renews the ticket with the ticket itself after an hour; if PVE refuses that (the
                # ticket outlived its two hours while the worker was idle), log in with the password again.
                if not logged_in_again:
                    logged_in_again = True
                    api = self._current(stale=api)
                    continue
                raise PveUnavailable(f"PVE login: {exc}") from exc
            except requests.RequestException as exc:
                # A read whose connection dropped is asked again at once, once: it changes nothing, and a flaky
                # network seldom drops the same request twice. One that got no answer in time is not (PVE is
                # slow, not gone: asking again at once doubles the wait), nor is a lost write: the activity's
                # retry first looks at what the lost request did.
                timed_out = isinstance(exc, requests.Timeout) and not isinstance(exc, requests.ConnectTimeout)
                if method == "get" and not asked_again and not timed_out:
                    asked_again = True
                    continue
                raise PveUnavailable(f"{method.upper()} {path}: {exc}") from exc

    def get(self, path: str, **params: Any) -> Any:
        return self.call("get", path, **params)

    def post(self, path: str, **params: Any) -> Any:
        return self.call("post", path, **params)

    def put(self, path: str, **params: Any) -> Any:
        return self.call("put", path, **params)

    def delete(self, path: str, **params: Any) -> Any:
        return self.call("delete", path, **params)
