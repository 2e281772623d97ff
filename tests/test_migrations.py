"""Migrations: one head, upgrade from empty on SQLite and PostgreSQL, and the result matches the models."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from worker import migrate
from worker.jobs.db import make_engine
from worker.jobs.models import Base


def test_single_head():
    heads = ScriptDirectory.from_config(migrate.alembic_config("sqlite://")).get_heads()
    assert len(heads) == 1, heads


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_upgrade_from_empty_matches_the_models(backend, tmp_path, request):
    url = f"sqlite:///{tmp_path / 'm.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    migrate.upgrade(url)
    assert migrate.current(url) == ScriptDirectory.from_config(migrate.alembic_config(url)).get_current_head()
    with make_engine(url).connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == [], f"models and migrations differ: {diff} (autogenerate a new revision)"
    migrate.upgrade(url)  # idempotent
