"""Rows → JSON, the same for the API and the pages' polling endpoint (one shape, documented in openapi.py)."""

from __future__ import annotations

from datetime import datetime

from flask import url_for

from worker.jobs import Delivery, Job, JobLog, Rule
from worker.jobs.models import utcnow

from .services import services


def iso(value: datetime | None) -> str | None:
    return value.isoformat(timespec="seconds") + "Z" if value else None


def eta_seconds(job: Job) -> float | None:
    """Remaining seconds at the average byte rate of this attempt so far (None when it cannot be told yet)."""
    if job.status != "running" or not job.started_at or not job.bytes_total or not job.bytes_done:
        return None
    elapsed = (utcnow() - job.started_at).total_seconds()
    if elapsed <= 0:
        return None
    rate = job.bytes_done / elapsed
    return round(max(0.0, (job.bytes_total - job.bytes_done) / rate), 1) if rate > 0 else None


def job_json(job: Job) -> dict:
    svc = services()
    return {
        "id": job.id,
        "status": job.status,
        "phase": job.phase,
        "door": job.door,
        "owner": job.owner,
        "attempts": job.attempts,
        "cancel_requested": bool(job.cancel_requested),
        "adapter": job.adapter_repo,
        "adapter_revision": job.adapter_revision,
        "adapter_sha": job.adapter_sha,
        "base": job.base_repo,
        "base_revision": job.base_revision,
        "base_sha": job.base_sha,
        "target": job.target_repo,
        "private": bool(job.private),
        "dtype": job.dtype,
        "rule_id": job.rule_id,
        "progress": {
            "done": job.tensors_done or 0,
            "total": job.tensors_total or 0,
            "bytes_done": job.bytes_done or 0,
            "bytes_total": job.bytes_total or 0,
            "eta_seconds": eta_seconds(job),
        },
        "stats": {
            "peak_rss_bytes": job.peak_rss_bytes,
            "peak_vram_bytes": job.peak_vram_bytes,
            "bytes_read": job.bytes_read,
            "bytes_written": job.bytes_written,
            "seconds": job.seconds,
            "queue_wait_seconds": job.queue_wait_seconds,
            "startup_seconds": job.startup_seconds,
        },
        "result": {"repo": job.result_repo, "commit": job.result_commit, "url": job.result_url},
        "error": job.error,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "url": svc.url(url_for("api.get_job", job_id=job.id)),
        "html_url": svc.url(url_for("ui.job_page", job_id=job.id)),
    }


def log_json(line: JobLog) -> dict:
    return {"id": line.id, "at": iso(line.at), "level": line.level, "message": line.message}


def rule_json(rule: Rule, secret: str | None = None) -> dict:
    out = {
        "id": rule.id,
        "watch": rule.watch,
        "target": rule.target,
        "base": rule.base,
        "base_revision": rule.base_revision,
        "private": bool(rule.private),
        "dtype": rule.dtype,
        "enabled": bool(rule.enabled),
        "created_at": iso(rule.created_at),
        "webhook_url": webhook_url(rule.id),
    }
    if secret is not None:  # only in the answer that creates the rule
        out["secret"] = secret
    return out


def webhook_url(rule_id: str) -> str:
    return services().url(url_for("hooks.hub_hook", rule_id=rule_id))


def delivery_json(d: Delivery) -> dict:
    return {"id": d.id, "received_at": iso(d.received_at), "repo": d.repo, "new_sha": d.new_sha, "outcome": d.outcome,
            "reason": d.reason, "job_id": d.job_id}
