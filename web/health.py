"""`GET /healthz`: can this web process reach its database and its broker (200, or 503 naming what is down), which
workers it can see and how deep the queue is.

Workers are counted, not named: /healthz is unauthenticated and worker names carry host names (Flower, behind its
password, names them). Workers and queue depth are reported, never judged: a web with no worker up is still a healthy web (jobs wait
in the queue, and the reconciler re-sends them), so they do not turn the answer into a 503 that would make an
orchestrator restart the wrong container. Both are cached for a few seconds: a load balancer probing every
second must not turn into a Celery broadcast every second.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from flask import Blueprint, current_app, jsonify
from sqlalchemy import func, select, text

from worker.jobs import Job, JobStatus
from worker.jobs.models import utcnow

from .services import services

bp = Blueprint("health", __name__)

PING_TIMEOUT = 1.0  # seconds a Celery ping waits for answers (the probe's own timeout is longer)
CACHE_SECONDS = 10.0
_cache_lock = threading.Lock()


@bp.get("/healthz")
def healthz():
    """Database and broker reachability; the workers this web can see and the queue depth."""
    svc = services()
    report = {"database": _database(svc.db), "broker": _broker(svc.settings.broker_url)}
    ok = all(v == "ok" for v in report.values())
    extra = {}
    if report["database"] == "ok":
        extra["queue"] = queue_depth(svc)
    extra["workers"] = _cached("workers", lambda: workers(svc, report))
    return jsonify(status="ok" if ok else "unavailable", **report, **extra), 200 if ok else 503


def _cached(key: str, compute):
    cache = current_app.extensions.setdefault("lorafold.health", {})  # per app: two apps never share answers
    now = time.monotonic()
    with _cache_lock:
        hit = cache.get(key)
        if hit and now - hit[0] < CACHE_SECONDS:
            return hit[1]
    value = compute()
    with _cache_lock:
        cache[key] = (now, value)
    return value


def queue_depth(svc) -> dict:
    """Jobs waiting (queued rows: the truth) and running; plus the broker's own list length where that is one
    cheap command (Redis). The two differ while the reconciler re-sends jobs a broker lost."""
    with svc.db.session() as s:
        counts = dict(s.execute(select(Job.status, func.count()).where(
            Job.status.in_((JobStatus.queued.value, JobStatus.running.value))).group_by(Job.status)).all())
        oldest = s.scalar(select(func.min(Job.created_at)).where(Job.status == JobStatus.queued.value))
    out = {"queued": counts.get("queued", 0), "running": counts.get("running", 0),
           "oldest_queued_seconds": round((utcnow() - oldest).total_seconds(), 1) if oldest else None}
    url = svc.settings.broker_url
    if url.startswith(("redis://", "rediss://")):
        out["broker_messages"] = _redis_length(url)
    return out


def _redis_length(url: str) -> int | None:
    try:
        import redis

        from worker.service.queue import MERGE_QUEUE

        client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        try:
            return int(client.llen(MERGE_QUEUE))
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - reported as unknown
        return None


def workers(svc, report: dict) -> dict:
    """Workers that answer a Celery ping (brokers that can broadcast), else those holding a live lease on a
    running job (the embedded broker cannot broadcast, so idle workers are invisible there; said so)."""
    url = svc.settings.broker_url
    if report.get("broker") == "ok" and not url.startswith("sqla+"):
        try:
            from worker.service.queue import make_celery

            app = make_celery(svc.settings)
            try:
                replies = app.control.ping(timeout=PING_TIMEOUT) or []
            finally:
                app.close()
            return {"count": len({name for reply in replies for name in reply}), "seen_by": "celery ping"}
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            return {"count": None, "seen_by": f"celery ping failed ({type(exc).__name__})"}
    if report.get("database") != "ok":
        return {"count": None, "seen_by": "nothing (the database is down)"}
    with svc.db.session() as s:
        names = set(s.scalars(select(Job.worker).where(
            Job.status == JobStatus.running.value, Job.lease_until > utcnow(), Job.worker.is_not(None))))
    return {"count": len({n.rsplit(":", 1)[0] for n in names}),
            "seen_by": "leases of running jobs (the embedded broker cannot broadcast: idle workers are not shown)"}


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
