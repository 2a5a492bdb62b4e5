"""Configuration shared by every process: environment variables, or a .env file in the working directory."""

from functools import lru_cache

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    database_url: str = "sqlite:///var/app.db"

    temporal_address: str = "localhost:7233"
    temporal_namespace: str = "default"
    temporal_task_queue: str = "vm-manage"

    pve_host: str = "127.0.0.1"
    pve_port: int = 8006
    pve_user: str = "root@pam"
    pve_password: str = ""
    pve_token_name: str = ""
    pve_token_value: str = ""
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

    @property
    def pve_verify(self) -> bool | str:
        """What requests' `verify` takes: a CA bundle path, or whether to verify at all."""
        if not self.pve_verify_ssl:
            return False
        return self.pve_ca_file or True


@lru_cache
def get_settings() -> Settings:
    return Settings()
