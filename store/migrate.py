"""Run Alembic migrations from code (CLI, start-up, tests)."""

from __future__ import annotations

from alembic import command
from alembic.config import Config

from config import PROJECT_ROOT


def alembic_config(database_url: str) -> Config:
    """Alembic config pointing at migrations/ with an explicit URL."""
    cfg = Config(str(PROJECT_ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(PROJECT_ROOT / "migrations"))
    cfg.attributes["database_url"] = database_url
    cfg.attributes["configure_logger"] = False
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    """Migrate the database up to revision."""
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str = "base") -> None:
    """Migrate the database down to revision."""
    command.downgrade(alembic_config(database_url), revision)
