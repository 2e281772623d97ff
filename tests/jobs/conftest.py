"""A migrated database per test: SQLite file and real PostgreSQL (the same code must run on both)."""

from __future__ import annotations

import pytest

from worker import migrate
from worker.jobs import Database, JobStore, SecretBox


@pytest.fixture
def db(database_url) -> Database:
    migrate.upgrade(database_url)
    return Database(database_url)


@pytest.fixture
def box() -> SecretBox:
    return SecretBox("test-secret-key-for-lorafold")


@pytest.fixture
def store(db, box) -> JobStore:
    return JobStore(db, box)
