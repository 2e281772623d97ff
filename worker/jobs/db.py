"""Engines and sessions for SQLite (the embedded default) and PostgreSQL (production), with fork safety."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

_engines: dict[str, Engine] = {}


def make_engine(url: str) -> Engine:
    """One engine per URL per process (pools must never cross a fork: `dispose_all` runs after fork)."""
    engine = _engines.get(url)
    if engine is not None:
        return engine
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # several processes write: WAL + waiting instead of failing
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()
    else:
        engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10, pool_recycle=1800)
    _engines[url] = engine
    return engine


def dispose_all() -> None:
    """After fork (Celery prefork child, gunicorn worker): drop inherited connections without closing them."""
    for engine in _engines.values():
        engine.dispose(close=False)


def close_all() -> None:
    """A process about to leave without the interpreter's teardown (a job process): close its pooled connections,
    so the database sees a clean goodbye rather than a dropped socket."""
    for engine in _engines.values():
        engine.dispose()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=dispose_all)


class Database:
    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(url)
        self.Session = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self):
        s: Session = self.Session()
        try:
            yield s
            s.commit()
        except BaseException:
            s.rollback()
            raise
        finally:
            s.close()

    def create_all(self) -> None:
        """Tests only; real installs use the Alembic migrations (`lorafold db upgrade`)."""
        from .models import Base

        Base.metadata.create_all(self.engine)
