"""Apply the Alembic migrations programmatically (`lorafold db upgrade`, `make run`, the compose migrate step)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

ROOT = Path(__file__).resolve().parent.parent


def alembic_config(database_url: str) -> Config:
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    cfg.attributes["database_url"] = database_url
    return cfg


def upgrade(database_url: str) -> None:
    command.upgrade(alembic_config(database_url), "head")


def current(database_url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    from .jobs.db import make_engine

    with make_engine(database_url).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
