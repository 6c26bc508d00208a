"""Typed settings, read once from CXR_-prefixed environment variables; beneath every package, importing none.

`load_settings()` reads the environment (each app or process calls it once, at start, and passes the result
down). Only development and tests get defaults for the secret, the database and the broker; production refuses
to start without them.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

PREFIX = "CXR_"
PROJECT_ROOT = Path(__file__).resolve().parent
SHARED_CXR_DATA = PROJECT_ROOT.parent / "shared" / "data" / "cxr"
LOCKED_SPLIT = PROJECT_ROOT / "model" / "splits" / "cxr_split_v1.csv"
# Settings production must be given explicitly (no development default may reach production).
REQUIRED_IN_PRODUCTION = ("database_url", "broker_url", "secret_key", "deid_key")


class ConfigError(RuntimeError):
    """A setting is missing or invalid."""


class Settings(BaseSettings):
    """Every runtime setting of web, worker, intake and CLI (CXR_<NAME> for each field)."""

    model_config = SettingsConfigDict(
        env_prefix=PREFIX, env_ignore_empty=True, frozen=True, extra="ignore", case_sensitive=False
    )

    env: Literal["development", "production", "test"] = "development"
    data_dir: Path = PROJECT_ROOT / "var"
    database_url: str = ""  # default: SQLite under data_dir (development and tests only)
    broker_url: str = ""  # default: filesystem:// (folders under data_dir/broker)
    secret_key: str = ""  # default: a random key kept in data_dir/dev-secret-key
    model_dir: Path | None = None
    # 64: as fast end to end as 32 with all processes sharing the cores, and faster with inference on a core
    # of its own (per-chunk SQL and queue costs halve per study); bench/README.md, session 2.
    chunk_size: int = 64
    max_attempts: int = 3
    running_lease_s: int = 300
    queued_lease_s: int = 1800
    task_hard_time_limit_s: int = 0  # default: max(60, running_lease_s - 30)
    task_soft_time_limit_s: int = 0  # default: max(30, task_hard_time_limit_s - 30)
    # How often beat runs the reconciler (lease-expired studies, messages the broker lost): a cheap query.
    reconcile_every_s: int = 30
    # Studies QUEUED in SQL longer than this whose message the broker no longer holds (a Redis restart or
    # flush) are sent again by the reconciler (worker.recovery.resend_lost).
    requeue_lost_after_s: int = 30
    # A task that meets a database or broker outage retries (same task id, so the same SQL claim) after a
    # random delay in [0, min(max, base * 2**retries)] s ("full jitter"), at most task_max_retries times.
    task_max_retries: int = 20
    task_retry_backoff_s: float = 1.0
    task_retry_backoff_max_s: float = 30.0
    max_upload_bytes: int = 512 * 1024 * 1024
    max_files_per_upload: int = 1000
    max_image_pixels: int = 50_000_000
    tls: bool = False  # the site is served over HTTPS (at a proxy): send HSTS, secure cookies
    retrain_cron: str = "0 2 * * *"
    retrain_epochs: int = 30
    retrain_seeds: Annotated[tuple[int, ...], NoDecode] = (1,)
    retrain_base_data: Path = SHARED_CXR_DATA
    retrain_split: Path | None = None  # default: the locked split, or one made once from other base data
    retrain_lease_s: int = 1800
    retrain_time_limit_s: int = 6 * 3600
    gate_sensitivity_margin: float = 0.02
    gate_f1_margin: float = 0.02
    gate_ece_max: float = 0.10
    port: int = Field(default=8000, description="port of `cxr run`'s web app")
    # De-identification (intake.deid): the HMAC key of patient pseudonyms, UIDs and date shifts. Keep it
    # secret and never change it, or one patient's new studies no longer join their old ones.
    deid_key: str = ""  # default: a random key kept in data_dir/dev-deid-key (development and tests only)
    # DICOM C-STORE receiver (intake.dicom_receiver, `cxr dicom-listen`, started by `cxr run`).
    dicom_host: str = "127.0.0.1"  # 0.0.0.0 to accept modalities on the network
    dicom_port: int = 11112  # 0: `cxr run` does not start the receiver
    dicom_ae_title: str = "CXR_SCREEN"
    # Calling AE titles accepted (comma-separated); empty: any (protect the port by network rules then).
    dicom_calling_aes: Annotated[tuple[str, ...], NoDecode] = ()
    dicom_owner: str = "dicom"  # the user who owns received batches (created on first start if missing)
    dicom_batch_window_s: int = 60  # a calling AE's associations this close together join one batch
    dicom_max_associations: int = 4
    dicom_max_pdu_bytes: int = 65536  # the largest PDU we accept (advertised in the association)
    dicom_max_instance_bytes: int = 64 * 1024 * 1024
    dicom_timeout_s: int = 30  # ACSE, DIMSE and network idle time-outs
    # Where SR and Secondary Capture results go by C-STORE: "AE@host:port"; empty: download only.
    dicom_destination: str = ""
    dicom_results: bool = True  # make an SR and a Grad-CAM Secondary Capture for each finished DICOM study
    # Operations (issue 14, docs/operations.md): logs and the worker's Prometheus exporter.
    log_format: Literal["text", "json"] = "text"  # json: one JSON object per line, with batch and study ids
    log_level: str = "INFO"
    worker_metrics_port: int = 0  # a worker's /metrics port (its pool processes added up); 0: none
    # Rate limits (issue 13, web/ratelimit.py, Flask-Limiter): counters live in this storage, shared by every
    # web process. Default: memory:// in development and tests; in production the broker when it is Redis.
    ratelimit_storage_url: str = ""
    ratelimit_upload: str = "30/minute;300/hour"  # uploads per user (web form and API together)
    ratelimit_api: str = "600/minute"  # JSON API requests per user (per address without a valid token)
    # Failed sign-ins: this many are free per user name (known or not) and per client address within the
    # window; each one after that doubles the wait, from login_backoff_s up to login_backoff_max_s.
    login_account_failures: int = 5
    login_address_failures: int = 20
    login_backoff_s: int = 2
    login_backoff_max_s: int = 900
    login_window_s: int = 3600
    proxy_hops: int = 0  # trusted reverse proxies in front of the web (their X-Forwarded-For is believed)
    # Bytes actually inflated from uploaded zips (intake.files), counted as they inflate: per member, per
    # upload (default: max_upload_bytes) and for the whole process (every request's bytes in flight together,
    # decoded DICOM pixels included).
    zip_member_max_bytes: int = 64 * 1024 * 1024
    max_inflated_bytes: int = 0
    max_inflight_bytes: int = 1024 * 1024 * 1024

    @field_validator("retrain_seeds", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                seeds = tuple(int(x) for x in value.split(",") if x.strip())
            except ValueError as exc:
                raise ValueError(
                    f"{PREFIX}RETRAIN_SEEDS must be comma-separated integers, got {value!r}"
                ) from exc
            return seeds or (1,)
        return value

    @field_validator("dicom_calling_aes", mode="before")
    @classmethod
    def _ae_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(x.strip() for x in value.split(",") if x.strip())
        return value

    @field_validator("dicom_ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        value = value.strip()
        if not 1 <= len(value) <= 16 or "\\" in value:
            raise ValueError(f"{PREFIX}DICOM_AE_TITLE must be 1-16 characters, got {value!r}")
        return value

    @field_validator("dicom_destination")
    @classmethod
    def _destination(cls, value: str) -> str:
        value = value.strip()
        if value and parse_destination(value) is None:
            raise ValueError(f"{PREFIX}DICOM_DESTINATION must look like AE@host:port, got {value!r}")
        return value

    @field_validator("retrain_cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        value = value.strip()
        if value != "off" and len(value.split()) != 5:
            raise ValueError(
                f"{PREFIX}RETRAIN_CRON must be a 5-field cron expression or 'off', got {value!r}"
            )
        return value

    @field_validator("ratelimit_upload", "ratelimit_api")
    @classmethod
    def _rate(cls, value: str) -> str:
        from limits import parse_many

        try:
            parse_many(value)
        except ValueError as exc:
            raise ValueError(f"not a rate limit like '30/minute;300/hour' ({exc})") from exc
        return value

    @model_validator(mode="before")
    @classmethod
    def _production_needs_secrets(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("env") == "production":
            missing = [PREFIX + n.upper() for n in REQUIRED_IN_PRODUCTION if not data.get(n)]
            if missing:
                raise ValueError("production needs " + ", ".join(missing))
        return data

    @model_validator(mode="after")
    def _derived_defaults(self) -> Settings:
        # Frozen model: the defaults that depend on other settings are filled in once, here.
        data_dir = self.data_dir.resolve()
        base = self.retrain_base_data.resolve()
        hard = self.task_hard_time_limit_s or max(60, self.running_lease_s - 30)
        derived = {
            "data_dir": data_dir,
            "database_url": self.database_url or f"sqlite:///{data_dir / 'cxr.sqlite3'}",
            "broker_url": self.broker_url or "filesystem://",
            # Development and tests only: a per-data-dir random key, never a constant in the code.
            "secret_key": self.secret_key or _dev_secret(data_dir),
            "deid_key": self.deid_key or _dev_secret(data_dir, "dev-deid-key"),
            "model_dir": self.model_dir.resolve() if self.model_dir else None,
            "task_hard_time_limit_s": hard,
            "task_soft_time_limit_s": self.task_soft_time_limit_s or max(30, hard - 30),
            "retrain_base_data": base,
            "retrain_split": (self.retrain_split or _default_split(base, data_dir)).resolve(),
            "ratelimit_storage_url": self.ratelimit_storage_url or _ratelimit_storage(self),
            "max_inflated_bytes": self.max_inflated_bytes or self.max_upload_bytes,
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)
        return self

    @property
    def is_development(self) -> bool:
        """True when running the embedded development default."""
        return self.env == "development"

    @property
    def uses_filesystem_broker(self) -> bool:
        """True for the embedded broker that needs no server."""
        return self.broker_url.startswith("filesystem://")

    def with_overrides(self, **changes: Any) -> Settings:
        """A copy with these fields changed (tests point an app at a throwaway database this way)."""
        return self.model_copy(update=changes) if changes else self


def _default_split(base: Path, data_dir: Path) -> Path:
    """The locked split for the shared data; for other base data, one made once from that data, then kept."""
    if base == SHARED_CXR_DATA.resolve():
        return LOCKED_SPLIT
    return data_dir / "retrain" / f"split-{base.name}.csv"


def _ratelimit_storage(settings: Settings) -> str:
    """memory:// outside production; in production the broker when it is Redis, else a readable refusal."""
    if settings.env != "production":
        return "memory://"
    if settings.broker_url.startswith(("redis://", "rediss://")):
        return settings.broker_url
    raise ValueError(
        f"production needs {PREFIX}RATELIMIT_STORAGE_URL (e.g. redis://host:6379/1) when the broker is not "
        "Redis: rate limits must be counted in one place shared by every web process"
    )


def parse_destination(value: str) -> tuple[str, str, int] | None:
    """(AE title, host, port) of "AE@host:port", or None when it does not parse."""
    ae, sep, address = value.strip().partition("@")
    host, colon, port = address.rpartition(":")
    if not sep or not colon or not ae or not host or not port.isdigit() or len(ae) > 16:
        return None
    return ae, host, int(port)


def _dev_secret(data_dir: Path, name: str = "dev-secret-key") -> str:
    path = data_dir / name
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        data_dir.mkdir(parents=True, exist_ok=True)
        key = secrets.token_urlsafe(48)
        path.write_text(key)
        path.chmod(0o600)
        return key


def load_settings() -> Settings:
    """Read the settings from the environment; raise ConfigError with a readable message when invalid."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(
            (f"{PREFIX}{'.'.join(str(p) for p in err['loc']).upper()}: " if err["loc"] else "")
            + str(err["msg"]).removeprefix("Value error, ")
            for err in exc.errors()
        )
        raise ConfigError(problems) from exc
