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
def postgres_database(migrated: bool = False):
    """A fresh PostgreSQL database (conftest's `postgres_url` per test, module_stack per module), dropped afterwards.

    `migrated`: already at the migrations' head, cloned from this process's template (CREATE DATABASE ... TEMPLATE
    copies files; running the migrations again per test cost ~0.3 s, and the job and web tests take hundreds). A
    migrated database whose schema a test left as the template's is emptied and kept for the next test instead of
    dropped (`_recycle`): a clone and a drop cost PostgreSQL ~0.5 s of CPU, emptying ~10 tables a few ms."""
    import psycopg

    need_service("PostgreSQL", PG_HOST)
    host, port = PG_HOST.rsplit(":", 1)
    if migrated and _pool:
        name = _pool.pop()
    else:
        name = f"lorafold_test_{uuid.uuid4().hex[:12]}"
        template = f' TEMPLATE "{_migrated_template()}"' if migrated else ""
        with psycopg.connect(_admin(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"{template}')
    try:
        yield f"postgresql+psycopg://postgres@{host}:{port}/{name}"
    finally:
        if migrated and _recycle(name):
            _pool.append(name)
        else:
            _drop(name)


_pool: list[str] = []  # this process's emptied migrated databases, waiting for the next test

# What must be as the template left it for a used database to pass as fresh once its rows are gone: tables,
# columns, defaults, indexes, constraints, triggers, functions, types, schemas, extensions and the migration
# revision. A test that adds a trigger (tests/jobs) or migrates down gets a different fingerprint: dropped.
_FINGERPRINT = """
SELECT md5(coalesce(string_agg(x, '|' ORDER BY x), '')) FROM (
  SELECT 'c ' || table_name || '.' || column_name || ' ' || data_type || ' ' || is_nullable || ' '
         || coalesce(column_default, '') AS x FROM information_schema.columns WHERE table_schema = 'public'
  UNION ALL SELECT 'i ' || indexdef FROM pg_indexes WHERE schemaname = 'public'
  UNION ALL SELECT 'k ' || conrelid::regclass::text || ' ' || pg_get_constraintdef(oid) FROM pg_constraint
            WHERE connamespace = 'public'::regnamespace
  UNION ALL SELECT 't ' || tgrelid::regclass::text || ' ' || tgname FROM pg_trigger WHERE NOT tgisinternal
  UNION ALL SELECT 'f ' || oid::regprocedure::text FROM pg_proc WHERE pronamespace = 'public'::regnamespace
  UNION ALL SELECT 'y ' || typname FROM pg_type WHERE typnamespace = 'public'::regnamespace
  UNION ALL SELECT 'n ' || nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%' AND nspname <> 'information_schema'
  UNION ALL SELECT 'e ' || extname FROM pg_extension
  UNION ALL SELECT 'v ' || version_num FROM alembic_version
) q
"""
_fresh_fingerprint: str | None = None


def _recycle(name: str) -> bool:
    """Empty a used migrated database for the next test; False (then it is dropped) unless its schema is still
    exactly the template's and every row could be removed."""
    global _fresh_fingerprint
    import psycopg

    _drop_connections(name)
    host, port = PG_HOST.rsplit(":", 1)
    try:
        with psycopg.connect(f"host={host} port={port} user=postgres dbname={name}", autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE datname = current_database() AND pid <> pg_backend_pid()")
            if _fresh_fingerprint is None:
                with psycopg.connect(f"host={host} port={port} user=postgres dbname={_migrated_template()}") as t:
                    _fresh_fingerprint = t.execute(_FINGERPRINT).fetchone()[0]
                _drop_connections(_migrated_template())
            if conn.execute(_FINGERPRINT).fetchone()[0] != _fresh_fingerprint:
                return False
            tables = [r[0] for r in conn.execute(
                "SELECT quote_ident(tablename) FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'alembic_version'")]
            if tables:
                conn.execute(f"TRUNCATE {', '.join(tables)} RESTART IDENTITY CASCADE")
        return True
    except psycopg.Error:
        return False


def _admin() -> str:
    host, port = PG_HOST.rsplit(":", 1)
    return f"host={host} port={port} user=postgres dbname=postgres"


def _drop(name: str) -> None:
    import psycopg

    _drop_connections(name)
    with psycopg.connect(_admin(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


_template: str | None = None


def _migrated_template() -> str:
    """This test process's migrated template database, made on first use and dropped when the process ends (one per
    process: cloning needs the template free of other sessions, and other checkouts' runs share the server)."""
    global _template
    if _template is None:
        import atexit

        import psycopg

        from worker import migrate

        host, port = PG_HOST.rsplit(":", 1)
        name = f"lorafold_template_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(_admin(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        atexit.register(_drop, name)
        atexit.register(lambda: [_drop(db) for db in _pool])  # runs first (atexit is last in, first out)
        migrate.upgrade(f"postgresql+psycopg://postgres@{host}:{port}/{name}")
        _drop_connections(name)
        _template = name
    return _template


def _drop_connections(name: str) -> None:
    from worker.jobs.db import _engines

    for url in [u for u in _engines if u.endswith("/" + name)]:
        _engines.pop(url).dispose()


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
    """`request.param`'s database for one test: a SQLite file in `tmp_path`, or a fresh PostgreSQL database already
    migrated (the `migrated_postgres_url` fixture, dropped after the test)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    return request.getfixturevalue("migrated_postgres_url")
