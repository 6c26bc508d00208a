"""Settings read only from CXR_-prefixed environment variables."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "CXR_"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(RuntimeError):
    """A setting is missing or invalid."""


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(PREFIX + name, default)


def _number(name: str, default: float, kind: type, what: str):  # noqa: ANN202
    raw = _env(name)
    if raw is None or raw == "":
        return default
    try:
        return kind(raw)
    except ValueError as exc:
        raise ConfigError(f"{PREFIX}{name} must be {what}, got {raw!r}") from exc


def _int(name: str, default: int) -> int:
    return _number(name, default, int, "an integer")


def _float(name: str, default: float) -> float:
    return _number(name, default, float, "a number")


@dataclass(frozen=True)
class Settings:
    """Every runtime setting of web, worker and CLI."""

    env: str
    data_dir: Path
    database_url: str
    broker_url: str
    secret_key: str
    model_dir: Path | None
    chunk_size: int
    max_attempts: int
    running_lease_s: int
    queued_lease_s: int
    task_soft_time_limit_s: int
    task_hard_time_limit_s: int
    reconcile_every_s: int
    max_upload_bytes: int
    max_files_per_upload: int
    max_image_pixels: int
    retrain_cron: str = "0 2 * * *"
    retrain_epochs: int = 30
    retrain_seeds: tuple[int, ...] = (1,)
    retrain_base_data: Path = PROJECT_ROOT.parent / "shared" / "data" / "cxr"
    retrain_split: Path = PROJECT_ROOT / "model" / "splits" / "cxr_split_v1.csv"
    retrain_lease_s: int = 1800
    retrain_time_limit_s: int = 6 * 3600
    gate_sensitivity_margin: float = 0.02
    gate_f1_margin: float = 0.02
    gate_ece_max: float = 0.10
    broker_options: dict = field(default_factory=dict)

    @property
    def is_development(self) -> bool:
        """True when running the embedded development default."""
        return self.env == "development"

    @property
    def uses_filesystem_broker(self) -> bool:
        """True for the embedded broker that needs no server."""
        return self.broker_url.startswith("filesystem://")


def _retrain_settings(data_dir: Path) -> dict:
    """Retraining: schedule (cron, or "off"), epochs, seeds, base data, locked split, gate margins."""
    base = Path(_env("RETRAIN_BASE_DATA") or PROJECT_ROOT.parent / "shared" / "data" / "cxr").resolve()
    default_split = (
        PROJECT_ROOT / "model" / "splits" / "cxr_split_v1.csv"
        if base == (PROJECT_ROOT.parent / "shared" / "data" / "cxr").resolve()
        else data_dir / "retrain" / f"split-{base.name}.csv"  # made once from that data, then kept
    )
    seeds_raw = _env("RETRAIN_SEEDS") or "1"
    try:
        seeds = tuple(int(x) for x in seeds_raw.split(",") if x.strip())
    except ValueError as exc:
        raise ConfigError(
            f"{PREFIX}RETRAIN_SEEDS must be comma-separated integers, got {seeds_raw!r}"
        ) from exc
    cron = (_env("RETRAIN_CRON") or "0 2 * * *").strip()
    if cron != "off" and len(cron.split()) != 5:
        raise ConfigError(f"{PREFIX}RETRAIN_CRON must be a 5-field cron expression or 'off', got {cron!r}")
    return {
        "retrain_cron": cron,
        "retrain_epochs": _int("RETRAIN_EPOCHS", 30),
        "retrain_seeds": seeds or (1,),
        "retrain_base_data": base,
        "retrain_split": Path(_env("RETRAIN_SPLIT") or default_split).resolve(),
        "retrain_lease_s": _int("RETRAIN_LEASE_S", 1800),
        "retrain_time_limit_s": _int("RETRAIN_TIME_LIMIT_S", 6 * 3600),
        "gate_sensitivity_margin": _float("GATE_SENSITIVITY_MARGIN", 0.02),
        "gate_f1_margin": _float("GATE_F1_MARGIN", 0.02),
        "gate_ece_max": _float("GATE_ECE_MAX", 0.10),
    }


def load_settings() -> Settings:
    """Read settings from the environment; only development gets defaults for secrets and URLs."""
    env = _env("ENV", "development") or "development"
    if env not in {"development", "production", "test"}:
        raise ConfigError(f"{PREFIX}ENV must be development, production or test, got {env!r}")
    data_dir = Path(_env("DATA_DIR") or PROJECT_ROOT / "var").resolve()
    database_url = _env("DATABASE_URL")
    broker_url = _env("BROKER_URL")
    secret_key = _env("SECRET_KEY")
    if env == "production":
        missing = [
            n
            for n, v in (
                ("DATABASE_URL", database_url),
                ("BROKER_URL", broker_url),
                ("SECRET_KEY", secret_key),
            )
            if not v
        ]
        if missing:
            raise ConfigError("production needs " + ", ".join(PREFIX + m for m in missing))
    database_url = database_url or f"sqlite:///{data_dir / 'cxr.sqlite3'}"
    broker_url = broker_url or "filesystem://"
    if not secret_key:
        # Development and tests only: a per-data-dir random key, never a constant in the code.
        secret_key = _dev_secret(data_dir)
    running_lease = _int("RUNNING_LEASE_S", 300)
    hard_limit = _int("TASK_HARD_TIME_LIMIT_S", max(60, running_lease - 30))
    model_dir = _env("MODEL_DIR")
    return Settings(
        env=env,
        data_dir=data_dir,
        database_url=database_url,
        broker_url=broker_url,
        secret_key=secret_key,
        model_dir=Path(model_dir).resolve() if model_dir else None,
        # 64: as fast end to end as 32 with all processes sharing the cores, and faster with inference on a
        # core of its own (per-chunk SQL and queue costs halve per study); bench/README.md, session 2.
        chunk_size=_int("CHUNK_SIZE", 64),
        max_attempts=_int("MAX_ATTEMPTS", 3),
        running_lease_s=running_lease,
        queued_lease_s=_int("QUEUED_LEASE_S", 1800),
        task_soft_time_limit_s=_int("TASK_SOFT_TIME_LIMIT_S", max(30, hard_limit - 30)),
        task_hard_time_limit_s=hard_limit,
        reconcile_every_s=_int("RECONCILE_EVERY_S", 60),
        max_upload_bytes=_int("MAX_UPLOAD_BYTES", 512 * 1024 * 1024),
        max_files_per_upload=_int("MAX_FILES_PER_UPLOAD", 1000),
        max_image_pixels=_int("MAX_IMAGE_PIXELS", 50_000_000),
        **_retrain_settings(data_dir),
    )


def _dev_secret(data_dir: Path) -> str:
    path = data_dir / "dev-secret-key"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        data_dir.mkdir(parents=True, exist_ok=True)
        key = secrets.token_urlsafe(48)
        path.write_text(key)
        path.chmod(0o600)
        return key
