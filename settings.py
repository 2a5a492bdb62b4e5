"""Configuration shared by every process: environment variables, or a .env file in the working directory."""

from functools import lru_cache
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class SettingsError(ValueError):
    """A setting a process needs is missing or unusable; the process refuses to start and says which."""


class Settings(BaseSettings):
    """Secrets are SecretStr: a repr, a debug print or a log line of the settings shows `**********`, and
    reading one takes `.get_secret_value()` where it is used. The database URL is one too, since it holds the
    database password."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    database_url: SecretStr = SecretStr("sqlite:///var/app.db")

    temporal_address: str = "localhost:7233"
    temporal_namespace: str = "default"
    temporal_task_queue: str = "vm-manage"
    # mTLS to the Temporal frontend: PEM files of the client certificate and its key, and of the CA that signed
    # the server's certificate (empty: the system's roots). An API key (Temporal Cloud) turns TLS on by itself.
    temporal_tls_cert: str = ""
    temporal_tls_key: str = ""
    temporal_tls_ca: str = ""
    temporal_api_key: SecretStr = SecretStr("")

    pve_host: str = "127.0.0.1"
    pve_port: int = 8006
    # No default: an operator names the (least-privileged) user the service acts as, never root by accident.
    pve_user: str | None = None
    pve_password: SecretStr = SecretStr("")
    pve_token_name: str = ""
    pve_token_value: SecretStr = SecretStr("")
    pve_verify_ssl: bool = True
    pve_ca_file: str = ""
    # proxmoxer's own default (5 s) is too short for PVE under load.
    pve_timeout_seconds: float = 20.0

    default_storage: str = "NFS"

    # Full clones running at once per PVE node (the template's, whose worker copies the disk) and per target
    # storage; more wait their turn inside the workflow. Real PVE times out on storage locks in clone storms.
    # 0: no limit.
    clone_limit_per_node: int = 4
    clone_limit_per_storage: int = 4

    # How long the POST may take to admit a request before it answers 503 and gives the request up.
    admission_timeout_seconds: float = 20.0

    # Authenticated requests a minute per token, counted in the database so that every API process shares the
    # count; past it 429 with Retry-After. 0: no limit (the benchmark measures the service, not the limit).
    rate_limit_per_minute: int = Field(default=600, ge=0)

    # The worker's Prometheus endpoint (the Temporal SDK's metrics and the service's, on one port); 0: off.
    worker_metrics_port: int = Field(default=9464, ge=0, le=65535)
    # text, or json: one JSON object a line, for a log collector (logs.py).
    log_format: Literal["text", "json"] = "text"

    def require_pve_user(self) -> str:
        """The PVE user, for what talks to PVE (the worker, `boxctl reconcile`); the API needs none."""
        if not self.pve_user:
            raise SettingsError(
                "PVE_USER is not set: name the PVE user the service logs in as (the API token's user with "
                "PVE_TOKEN_NAME/PVE_TOKEN_VALUE, e.g. boxes@pve; the README lists the privileges it needs)"
            )
        return self.pve_user

    @property
    def pve_verify(self) -> bool | str:
        """What requests' `verify` takes: a CA bundle path, or whether to verify at all."""
        if not self.pve_verify_ssl:
            return False
        return self.pve_ca_file or True


@lru_cache
def get_settings() -> Settings:
    return Settings()
