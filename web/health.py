"""`GET /healthz`: can this web process reach its database and its broker? 200 or 503 naming what is down."""

from __future__ import annotations

import os
from pathlib import Path

from flask import Blueprint, jsonify
from sqlalchemy import text

from .services import services

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    """Database and broker reachability."""
    svc = services()
    report = {"database": _database(svc.db), "broker": _broker(svc.settings.broker_url)}
    ok = all(v == "ok" for v in report.values())
    return jsonify(status="ok" if ok else "unavailable", **report), 200 if ok else 503


def _database(db) -> str:
    try:
        with db.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return "ok"
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return f"down ({type(exc).__name__})"


def _broker(url: str) -> str:
    try:
        if url.startswith(("redis://", "rediss://")):
            import redis

            client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
            try:
                client.ping()
            finally:
                client.close()
            return "ok"
        if url.startswith("sqla+sqlite"):
            path = url.split("///", 1)[-1]
            folder = Path(path).parent if path else Path(".")
            if not folder.is_dir() or not os.access(folder, os.W_OK):
                return "down (the embedded broker's folder is not writable)"
            if Path(path).exists() and not os.access(path, os.R_OK | os.W_OK):
                return "down (the embedded broker's database file is not writable)"
            return "ok"
        if url.startswith("sqla+"):
            from worker.jobs.db import make_engine

            with make_engine(url[len("sqla+"):]).connect() as conn:
                conn.execute(text("SELECT 1"))
            return "ok"
        from kombu import Connection

        with Connection(url, connect_timeout=2) as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return "ok"
    except Exception as exc:  # noqa: BLE001
        return f"down ({type(exc).__name__})"
