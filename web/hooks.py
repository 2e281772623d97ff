"""`POST /hooks/hub/<rule_id>`: the Hub's webhook for one rule (service-anchors.md (b) is the exact format).

Order: secret (constant time; 401 when missing, wrong, or the rule unknown: no existence leak) → JSON (400) →
filters (only `repo.content` on model repos matching the rule's watch pattern, the `refs/heads/main` update with a
new sha, not a repo lorafold itself publishes to); anything else is answered 200 `{"ignored": true, "reason"}`
because non-2xx answers count toward the Hub suspending the webhook. Then one `submit()` keyed by
(rule, repo, sha), so the Hub's retries and Replay button never make a second job → 202. Every call that passed
the secret is recorded as a Delivery (the rule's run history). The Hub is never called here: answers take
milliseconds; the worker checks that the push really is an adapter (else the job ends `skipped`).
"""

from __future__ import annotations

import fnmatch
import hmac
import re

from flask import Blueprint, jsonify, request
from sqlalchemy import select

from worker.jobs import Delivery, Job, JobRequest, Rule, submit
from worker.locations import is_repo_id
from worker.redact import register

from . import jobs
from .bodies import BodyError, read_json
from .errors import Unauthorized
from .rules import RULE_ID_RE, render_target, split_watch
from .services import services

bp = Blueprint("hooks", __name__, url_prefix="/hooks")

SHA_RE = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")
MAIN = "refs/heads/main"


@bp.post("/hub/<rule_id>")
def hub_hook(rule_id: str):
    """Receive a Hub webhook delivery for a rule."""
    rule = _authenticate(rule_id)
    try:
        payload = read_json()
    except BodyError:
        _record(rule, "ignored", "malformed JSON payload")
        raise
    verdict = _filter(rule, payload)
    if isinstance(verdict, str):
        _record(rule, "ignored", verdict, repo=_repo_name(payload))
        return jsonify(ignored=True, reason=verdict), 200
    repo, sha = verdict
    namespace, name = repo.split("/", 1)
    target = render_target(rule.target, namespace, name)
    if not is_repo_id(target):
        reason = f"the rule's target template gives {target[:100]!r}, not a repo id"
        _record(rule, "ignored", reason, repo=repo, sha=sha)
        return jsonify(ignored=True, reason=reason), 200
    svc = services()
    job_request = JobRequest(
        owner=rule.owner, door="webhook", adapter=repo, adapter_revision=sha, base=rule.base,
        base_revision=rule.base_revision, target=target, private=rule.private, dtype=rule.dtype, overwrite=True,
        rule_id=rule.id, credential_id=rule.credential_id, dedupe_key=f"rule:{rule.id}:{repo}:{sha}",
    )
    jobs.admit(rule.owner, job_request.dedupe_key)  # the owner's queued-jobs cap (429; the Hub retries later)
    job, created = submit(svc.db, svc.box, job_request, None, svc.enqueue)
    _record(rule, "queued" if created else "duplicate", None if created else "this push was already received",
            repo=repo, sha=sha, job_id=job.id)
    return jsonify(job=job.id, duplicate=not created), 202


def _authenticate(rule_id: str) -> Rule:
    """The rule, when the X-Webhook-Secret header is its secret; 401 for everything else, the same way."""
    given = request.headers.get("X-Webhook-Secret", "")
    rule = None
    if RULE_ID_RE.match(rule_id):
        with services().db.session() as s:
            rule = s.get(Rule, rule_id)
    expected = ""
    if rule is not None:
        try:
            expected = services().box.open(rule.secret_encrypted)
        except ValueError:
            expected = ""
    register(expected)  # from now on scrub() masks it in any string that leaves this process
    ok = hmac.compare_digest(given.encode("utf-8", "replace"), (expected or "\x00" * 43).encode())
    if not (ok and expected and given):
        raise Unauthorized("missing or wrong X-Webhook-Secret")
    return rule


def _repo_name(payload: object) -> str | None:
    repo = payload.get("repo") if isinstance(payload, dict) else None
    name = repo.get("name") if isinstance(repo, dict) else None
    return name[:200] if isinstance(name, str) else None


def _filter(rule: Rule, payload: object) -> tuple[str, str] | str:
    """(repo, new sha of main) for a push to merge, else the reason to ignore the delivery."""
    if not rule.enabled:
        return "the rule is disabled"
    if not isinstance(payload, dict):
        return "the payload is not a JSON object"
    event = payload.get("event")
    scope = event.get("scope") if isinstance(event, dict) else None
    if scope != "repo.content":
        return f"event scope {str(scope)[:40]!r} is not repo.content"
    repo = payload.get("repo")
    if not isinstance(repo, dict):
        return "no repo in the payload"
    if repo.get("type") != "model":
        return f"repo type {str(repo.get('type'))[:20]!r} is not model"
    name = repo.get("name")
    if not isinstance(name, str) or not is_repo_id(name):
        return "the payload's repo name is not a repo id"
    watched = split_watch(rule.watch)
    namespace, short = name.split("/", 1)
    if watched is None or namespace != watched[0] or not fnmatch.fnmatchcase(short, watched[1]):
        return f"{name} is not watched by this rule ({rule.watch})"
    refs = payload.get("updatedRefs")
    if not isinstance(refs, list):
        return "no updatedRefs in the payload"
    main = [r for r in refs if isinstance(r, dict) and r.get("ref") == MAIN]
    if not main:
        return "no update of refs/heads/main (a tag, a pull request or another branch)"
    sha = main[0].get("newSha")
    if sha is None:
        return "refs/heads/main was deleted"
    if not isinstance(sha, str) or not SHA_RE.match(sha):
        return "the new sha of refs/heads/main is not a commit id"
    if _is_our_output(name):
        return f"{name} is a repo lorafold publishes merges to (its own push)"
    return name, sha


def _is_our_output(repo: str) -> bool:
    with services().db.session() as s:
        return s.scalar(select(Job.id).where(Job.target_repo == repo).limit(1)) is not None


def _record(rule: Rule, outcome: str, reason: str | None, *, repo: str | None = None, sha: str | None = None,
            job_id: str | None = None) -> None:
    with services().db.session() as s:
        s.add(Delivery(rule_id=rule.id, repo=repo, new_sha=sha if sha and len(sha) <= 64 else None, outcome=outcome,
                       reason=(reason or None) and reason[:300], job_id=job_id))
