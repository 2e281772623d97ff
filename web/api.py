"""JSON API v1 (DESIGN.md "Contracts"; openapi.py documents every route). Bearer-token auth only, so no CSRF."""

from __future__ import annotations

import re

from flask import Blueprint, jsonify, request, url_for

from . import jobs, merge, rules
from .auth import api_caller
from .bodies import read_json
from .errors import Unprocessable
from .openapi import spec
from .present import delivery_json, job_json, log_json, rule_json
from .services import services

bp = Blueprint("api", __name__, url_prefix="/api/v1")

# The query parameters each endpoint takes (openapi.py describes the same): anything else is a 422 naming it,
# as unknown body fields are, so a typo (`?stauts=failed`) is never silently ignored.
QUERY = {"api.list_jobs": {"status", "limit", "cursor"}, "api.job_logs": {"after", "limit"}}


@bp.before_request
def _strict_query():
    allowed = QUERY.get(request.endpoint or "", set())
    for name in request.args:
        if name not in allowed:
            shown = name[:60] or "(empty name)"
            raise Unprocessable(f"unknown query parameter {shown!r}", field=shown)

IDEMPOTENCY_RE = re.compile(r"^[\x21-\x7e]{1,200}$")


def json_body() -> object:
    return read_json()  # web/bodies.py: size, content type, UTF-8, depth, duplicate keys, numbers (4xx, never 500)


def int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None:
        return default
    if not re.fullmatch(r"\d{1,12}", raw) or not low <= int(raw) <= high:
        raise Unprocessable(f"{name} must be an integer from {low} to {high}", field=name)
    return int(raw)


@bp.get("/openapi.json")
def openapi():
    """This API's OpenAPI 3.1 description."""
    return jsonify(spec(services().settings.public_url))


@bp.post("/jobs")
def create_job():
    """Queue a merge of an adapter into its base, or of a merge recipe, published to `target`."""
    caller = api_caller()
    key = request.headers.get("Idempotency-Key")
    if key is not None and not IDEMPOTENCY_RE.match(key):
        raise Unprocessable("Idempotency-Key must be 1-200 visible ASCII characters", field="Idempotency-Key")
    inp = merge.MergeInput.from_json(json_body())
    if key is not None:
        existing = _by_idempotency_key(caller.name, key)
        if existing is not None:
            if ((existing.adapter_repo or None, existing.target_repo, existing.recipe is not None)
                    != (inp.adapter, inp.target, inp.recipe is not None)):
                raise Unprocessable("this Idempotency-Key was used for a different request", field="Idempotency-Key")
            return _accepted(existing, replayed=True)
    jobs.admit(caller.name)  # before asking the Hub anything: a full queue is refused cheaply
    job, created = merge.create(caller, inp, "api", idempotency_key=key)
    return _accepted(job, replayed=not created)


def _by_idempotency_key(owner: str, key: str):
    from sqlalchemy import select

    from worker.jobs import Job

    with services().db.session() as s:
        return s.scalar(select(Job).where(Job.owner == owner, Job.idempotency_key == key))


def _accepted(job, *, replayed: bool):
    body = {"id": job.id, "status": job.status, "url": services().url(url_for("api.get_job", job_id=job.id)),
            "html_url": services().url(url_for("ui.job_page", job_id=job.id))}
    response = jsonify(body)
    response.status_code = 202
    response.headers["Location"] = url_for("api.get_job", job_id=job.id)
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


@bp.get("/jobs")
def list_jobs():
    """Your jobs and your organizations' jobs, newest first (filter with `status`, page with `cursor`)."""
    caller = api_caller()
    status = request.args.get("status")
    if status is not None and status not in jobs.STATUSES:
        raise Unprocessable(f"status must be one of {', '.join(jobs.STATUSES)}", field="status")
    limit = int_arg("limit", 50, 1, 200)
    cursor = request.args.get("cursor") or None
    if cursor is not None and len(cursor) > 200:
        raise Unprocessable("cursor is not one this service gave out", field="cursor")
    found, next_cursor = jobs.page(caller, status=status, limit=limit, cursor=cursor)
    return jsonify(jobs=[job_json(j) for j in found], next=next_cursor)


@bp.get("/jobs/<job_id>")
def get_job(job_id: str):
    """One job: status, progress, stats, result, error."""
    return jsonify(job_json(jobs.get(api_caller(), job_id)))


@bp.get("/jobs/<job_id>/logs")
def job_logs(job_id: str):
    """The job's log lines after `after` (a log id), oldest first; poll with the last id to tail."""
    job = jobs.get(api_caller(), job_id)
    after = int_arg("after", 0, 0, 2**62)
    limit = int_arg("limit", 200, 1, 1000)
    lines = jobs.logs(job, after=after, limit=limit)
    last = lines[-1].id if lines else after
    return jsonify(logs=[log_json(line) for line in lines], next=last if len(lines) == limit else None, last_id=last)


@bp.post("/jobs/<job_id>/cancel")
def cancel_job(job_id: str):
    """Cancel a queued or running job (a running one stops within seconds, publishing nothing)."""
    job = jobs.cancel(api_caller(), job_id)
    return jsonify(job_json(job)), 202


@bp.post("/jobs/<job_id>/retry")
def retry_job(job_id: str):
    """Queue a failed, cancelled or skipped job again, with your current token."""
    job = jobs.retry(api_caller(), job_id)
    return jsonify(job_json(job)), 202


@bp.post("/rules")
def create_rule():
    """Create an automation rule; the answer holds the webhook URL and secret (shown only here)."""
    caller = api_caller()
    rule, secret = rules.create(caller, rules.RuleInput.from_json(json_body()))
    response = jsonify(rule_json(rule, secret))
    response.status_code = 201
    response.headers["Location"] = url_for("api.get_rule", rule_id=rule.id)
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/rules")
def list_rules():
    """Your automation rules."""
    return jsonify(rules=[rule_json(r) for r in rules.owned(api_caller())])


@bp.get("/rules/<rule_id>")
def get_rule(rule_id: str):
    """One rule and its run history (the webhook deliveries it received)."""
    rule = rules.get(api_caller(), rule_id)
    return jsonify({**rule_json(rule), "deliveries": [delivery_json(d) for d in rules.deliveries(rule.id)]})


@bp.delete("/rules/<rule_id>")
def delete_rule(rule_id: str):
    """Delete a rule and the token it kept; its webhook URL stops working."""
    rules.remove(api_caller(), rule_id)
    return "", 204
