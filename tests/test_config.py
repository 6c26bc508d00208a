"""config.py: typed settings from CXR_ variables; production refuses defaults; no app is built at import."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from config import ConfigError, load_settings, parse_destination
from tests.procs import REPO_ROOT


def test_defaults_and_parsing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Development defaults live under the data dir; numbers, paths and comma lists are parsed and typed."""
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CXR_RETRAIN_SEEDS", "1,2,3")
    monkeypatch.setenv("CXR_CHUNK_SIZE", "")  # empty means the default
    monkeypatch.setenv("CXR_RUNNING_LEASE_S", "400")
    s = load_settings()
    assert s.database_url == f"sqlite:///{tmp_path / 'cxr.sqlite3'}" and s.broker_url == "filesystem://"
    assert s.retrain_seeds == (1, 2, 3) and s.chunk_size == 64
    assert (s.task_hard_time_limit_s, s.task_soft_time_limit_s) == (370, 340)
    assert s.secret_key == (tmp_path / "dev-secret-key").read_text().strip() == load_settings().secret_key


@pytest.mark.parametrize(
    ("name", "value"),
    [("CHUNK_SIZE", "many"), ("ENV", "staging"), ("RETRAIN_CRON", "daily"), ("RETRAIN_SEEDS", "a,b")],
)
def test_invalid_values_name_the_variable(
    name: str, value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An invalid value is a ConfigError that names the CXR_ variable."""
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CXR_" + name, value)
    with pytest.raises(ConfigError, match="CXR_" + name):
        load_settings()


def test_production_refuses_default_secret_database_and_broker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CXR_ENV=production needs the secret key, the database and the broker set explicitly."""
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CXR_ENV", "production")
    for name in ("CXR_DATABASE_URL", "CXR_BROKER_URL", "CXR_SECRET_KEY", "CXR_DEID_KEY"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="CXR_DATABASE_URL, CXR_BROKER_URL, CXR_SECRET_KEY, CXR_DEID_KEY"):
        load_settings()
    monkeypatch.setenv("CXR_DATABASE_URL", "postgresql+psycopg://u@h/db")
    monkeypatch.setenv("CXR_BROKER_URL", "redis://h:6379/0")
    with pytest.raises(ConfigError, match="CXR_SECRET_KEY"):
        load_settings()
    monkeypatch.setenv("CXR_SECRET_KEY", "k" * 48)
    with pytest.raises(ConfigError, match="CXR_DEID_KEY"):
        load_settings()
    monkeypatch.setenv("CXR_DEID_KEY", "p" * 48)
    settings = load_settings()
    assert settings.secret_key == "k" * 48 and settings.deid_key == "p" * 48
    assert not (tmp_path / "dev-secret-key").exists() and not (tmp_path / "dev-deid-key").exists()


def test_dicom_settings_parse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """AE lists are comma-separated; a destination must be AE@host:port; a bad one names its variable."""
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CXR_DICOM_CALLING_AES", "MODALITY1, PACS ")
    monkeypatch.setenv("CXR_DICOM_DESTINATION", "PACS@10.0.0.5:104")
    settings = load_settings()
    assert settings.dicom_calling_aes == ("MODALITY1", "PACS")
    assert parse_destination(settings.dicom_destination) == ("PACS", "10.0.0.5", 104)
    assert len(settings.deid_key) > 40  # the development key, kept in the data dir
    monkeypatch.setenv("CXR_DICOM_DESTINATION", "pacs:104")
    with pytest.raises(ConfigError, match="CXR_DICOM_DESTINATION"):
        load_settings()


def test_no_app_is_built_at_import(tmp_path: Path) -> None:
    """Importing the packages builds neither a Flask nor a Celery app; only `celery -A worker.main` does."""
    code = (
        "import gc, flask, web, worker.app, worker.tasks, cli.main\n"
        "apps = [o for o in gc.get_objects() if isinstance(o, (worker.app.CxrCelery, flask.Flask))]\n"
        "assert not apps, apps\n"
        "import worker.main\n"
        "assert isinstance(worker.main.app, worker.app.CxrCelery)\n"
    )
    env = {"PATH": "/usr/bin:/bin", "CXR_DATA_DIR": str(tmp_path), "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


def test_no_type_ignore_in_celery_configuration() -> None:
    """The Celery app carries typed settings: no `type: ignore` left in worker/."""
    for path in (REPO_ROOT / "worker").glob("*.py"):
        assert "type: ignore" not in path.read_text(), path


def test_rate_limit_storage_in_production(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Production counts rate limits in the Redis broker by default; with another broker it must be told
    where (CXR_RATELIMIT_STORAGE_URL); development and tests count in memory. A limit that does not parse
    names its variable."""
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path))
    assert load_settings().ratelimit_storage_url == "memory://"
    for name, value in (("DATABASE_URL", "postgresql+psycopg://u@h/db"), ("SECRET_KEY", "k" * 48)):
        monkeypatch.setenv("CXR_" + name, value)
    monkeypatch.setenv("CXR_DEID_KEY", "p" * 48)
    monkeypatch.setenv("CXR_ENV", "production")
    monkeypatch.setenv("CXR_BROKER_URL", "redis://h:6379/0")
    assert load_settings().ratelimit_storage_url == "redis://h:6379/0"
    monkeypatch.setenv("CXR_BROKER_URL", "amqp://guest:guest@h:5672//")
    with pytest.raises(ConfigError, match="CXR_RATELIMIT_STORAGE_URL"):
        load_settings()
    monkeypatch.setenv("CXR_RATELIMIT_STORAGE_URL", "redis://h:6379/3")
    assert load_settings().ratelimit_storage_url == "redis://h:6379/3"
    monkeypatch.setenv("CXR_RATELIMIT_API", "often")
    with pytest.raises(ConfigError, match="CXR_RATELIMIT_API"):
        load_settings()
