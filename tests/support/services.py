"""Where the tests find PostgreSQL and Redis, and the loud skip (or failure) when one is missing.

A helper module rather than conftest.py, so that tests and tests/support/stack.py import it like any module
(conftest files hold fixtures; pytest imports them itself).
"""

from __future__ import annotations

import os
import socket
import uuid
from contextlib import contextmanager

import pytest

PG_HOST = os.environ.get("LORAFOLD_TEST_PG", "127.0.0.1:5432")
REDIS_HOST = os.environ.get("LORAFOLD_TEST_REDIS", "127.0.0.1:6379")


def _reachable(hostport: str) -> bool:
    host, port = hostport.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


def need_service(name: str, hostport: str) -> None:
    if _reachable(hostport):
        return
    message = f"{name} is not reachable at {hostport}"
    if os.environ.get("LORAFOLD_REQUIRE_SERVICES"):
        pytest.fail(f"{message}, and LORAFOLD_REQUIRE_SERVICES=1 forbids skipping", pytrace=False)
    pytest.skip(f"SKIPPED LOUDLY: {message}; start it (see README) to run this test")


@contextmanager
def postgres_database():
    """A fresh PostgreSQL database (conftest's `postgres_url` per test, module_stack per module)."""
    import psycopg

    need_service("PostgreSQL", PG_HOST)
    host, port = PG_HOST.rsplit(":", 1)
    name = f"lorafold_test_{uuid.uuid4().hex[:12]}"
    admin = f"host={host} port={port} user=postgres dbname=postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@{host}:{port}/{name}"
    finally:
        from worker.jobs.db import _engines

        for url in [u for u in _engines if u.endswith("/" + name)]:
            _engines.pop(url).dispose()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def redis_database():
    """This test process's Redis database (flushed before and after). Each xdist worker gets
    its own database; LORAFOLD_TEST_REDIS_DB moves the range, so that test runs of several checkouts on one machine
    never flush each other's queues.."""
    import redis

    need_service("Redis", REDIS_HOST)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    base = int(os.environ.get("LORAFOLD_TEST_REDIS_DB", "1"))
    index = (base + (int(worker[2:]) if worker[2:].isdigit() else 0)) % 16
    url = f"redis://{REDIS_HOST}/{index}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


#: the databases a test taking `database_url` runs on (tests/conftest.py): the same code must run on both
DATABASES = ("sqlite", "postgres")


def database_url_for(request, tmp_path) -> str:
    """`request.param`'s database for one test: a SQLite file in `tmp_path`, or a fresh PostgreSQL database (the
    `postgres_url` fixture, dropped after the test)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    return request.getfixturevalue("postgres_url")
