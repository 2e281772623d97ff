"""`POST /hooks/hub/<rule_id>`: the Hub's webhook for one rule (service-anchors.md (b) is the exact format).

Order: secret (constant time; 401 when missing, wrong, or the rule unknown: no existence leak) → JSON (400) →
filters (only `repo.content` on model repos matching the rule's watch pattern, the `refs/heads/main` update with a
new sha, not a repo this rule publishes to; a rule that names its base; a target that is neither the pushed repo,
nor a watched repo, nor a base: checked again here with the concrete names); anything else is answered 200 `{"ignored": true, "reason"}`
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

from worker.jobs import Delivery, Job, JobRequest, MergeRequest, Rule
from worker.locations import is_repo_id
from worker.redact import register

from . import jobs, recipes
from .bodies import BodyError, read_json
from .errors import TooManyRequests, Unauthorized
from .rule_targets import render_target, split_watch, watches
from .rules import RULE_ID_RE
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
    repo, sha, old_sha = verdict
    namespace, name = repo.split("/", 1)
    # a recipe rule rebuilds one repo whichever of its adapters was pushed
    target = rule.target if rule.recipe is not None else render_target(rule.target, namespace, name)
    reason = _target_refusal(rule, repo, target)
    if reason:
        _record(rule, "ignored", reason, repo=repo, sha=sha)
        return jsonify(ignored=True, reason=reason), 200
    merge = MergeRequest(
        adapter=repo, adapter_revision=sha, base=rule.base, base_revision=rule.base_revision if rule.base else None,
        base_allowed=tuple(rule.bases) if not rule.base and rule.bases else None, target=target,
        private=rule.private, dtype=rule.dtype, overwrite=True, rule_id=rule.id, recipe=rule.recipe,
        from_quantized=rule.from_quantized or "original", keep_quantization=bool(rule.keep_quantization),
        formats=tuple((rule.formats or "safetensors").split(",")), gguf_outtype=rule.gguf_outtype or "f16",
    )
    job_request = JobRequest(
        owner=rule.owner, owner_id=rule.owner_id, namespace_id=rule.target_namespace_id, door="webhook", merge=merge,
        credential_id=rule.credential_id, dedupe_key=f"rule:{rule.id}:{repo}:{sha}",
    )
    try:  # the owner's queued-jobs cap (429; the Hub retries later): the rule's history says so
        jobs.admit(rule.owner, job_request.dedupe_key)
        job, created = jobs.queue_job(job_request, None)
    except TooManyRequests as exc:
        _record(rule, "refused", exc.message, repo=repo, sha=sha, old_sha=old_sha)
        raise
    _record(rule, "queued" if created else "duplicate", None if created else "this push was already received",
            repo=repo, sha=sha, old_sha=old_sha, job_id=job.id)
    return jsonify(job=job.id, duplicate=not created), 202


def _target_refusal(rule: Rule, repo: str, target: str) -> str | None:
    """Why this push may not be merged by this rule (it names only the rule's own repos), or None.

    Rules made before bases were required name none; the template checks of web/rules.py are repeated with the
    concrete names, for rules made before them and because the Hub resolves names case-insensitively."""
    if rule.recipe is not None:  # its base is the recipe's; its target one repo, none of the recipe's inputs
        if not is_repo_id(target):
            return f"the rule's target {target[:100]!r} is not a repo id"
        if target.lower() in recipes.rule_inputs(rule.recipe):
            return f"the rule's target, {target}, is one of its recipe's inputs"
        return None
    if not rule.base and not rule.bases:
        return "this rule names no base (a pushed adapter config never chooses it): create the rule again with a base"
    if not is_repo_id(target):
        return f"the rule's target template gives {target[:100]!r}, not a repo id"
    if target.lower() == repo.lower():
        return "the rule's target for this push is the pushed repo itself"
    if watches(rule.watch, target):
        return f"the rule's target for this push, {target}, is a repo this rule watches"
    if target.lower() in {b.lower() for b in [rule.base, *(rule.bases or [])] if b}:
        return f"the rule's target for this push, {target}, is one of the rule's bases"
    return None


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


def _filter(rule: Rule, payload: object) -> tuple[str, str, str | None] | str:
    """(repo, new sha of main) for a push to merge, else the reason to ignore the delivery. The checks run in this
    order and the first failing one is the reason."""
    reason = _delivery_reason(rule, payload) or _repo_reason(rule, payload)
    if reason is not None:
        return reason
    name = payload["repo"]["name"]
    update = _main_update(payload)
    if isinstance(update, str):
        return update
    if _is_our_output(rule, name):
        return f"{name} is a repo this rule publishes merges to (its own push)"
    old = update.get("oldSha")  # all zeros when the branch was created; only ever used to order this rule's jobs
    return name, update["newSha"], old if isinstance(old, str) and SHA_RE.match(old) and old.strip("0") else None


def _delivery_reason(rule: Rule, payload: object) -> str | None:
    """Why no delivery to this rule is merged at all: the rule is off, or the payload is not a repo content event."""
    if not rule.enabled:
        return "the rule is disabled"
    if not isinstance(payload, dict):
        return "the payload is not a JSON object"
    event = payload.get("event")
    scope = event.get("scope") if isinstance(event, dict) else None
    if scope != "repo.content":
        return f"event scope {str(scope)[:40]!r} is not repo.content"
    return None


def _repo_reason(rule: Rule, payload: dict) -> str | None:
    """Why the payload's repo is not one this rule merges: not a model, not a repo id, or not matched by the watch."""
    repo = payload.get("repo")
    if not isinstance(repo, dict):
        return "no repo in the payload"
    if repo.get("type") != "model":
        return f"repo type {str(repo.get('type'))[:20]!r} is not model"
    name = repo.get("name")
    if not isinstance(name, str) or not is_repo_id(name):
        return "the payload's repo name is not a repo id"
    if rule.recipe is not None:
        adapters = recipes.rule_adapters(rule.recipe)
        if adapters is None:
            return "this rule's recipe no longer parses: create the rule again"
        if name.lower() not in adapters:
            return f"{name} is not an adapter of this rule's recipe"
        return None
    watched = split_watch(rule.watch)
    namespace, short = name.split("/", 1)
    if watched is None or namespace != watched[0] or not fnmatch.fnmatchcase(short, watched[1]):
        return f"{name} is not watched by this rule ({rule.watch})"
    return None


def _main_update(payload: dict) -> dict | str:
    """The payload's update of refs/heads/main with a valid new commit id, else why there is none to merge."""
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
    return main[0]


def _is_our_output(rule: Rule, repo: str) -> bool:
    """Whether this rule published to `repo`. Only this rule's jobs are looked at: the reason is shown to whoever
    holds the rule's secret, and other users' targets (private repo names among them) are none of their business."""
    with services().db.session() as s:
        return s.scalar(select(Job.id).where(Job.rule_id == rule.id, Job.target_repo == repo).limit(1)) is not None


def _record(rule: Rule, outcome: str, reason: str | None, *, repo: str | None = None, sha: str | None = None,
            old_sha: str | None = None, job_id: str | None = None) -> None:
    with services().db.session() as s:
        s.add(Delivery(rule_id=rule.id, repo=repo, new_sha=sha if sha and len(sha) <= 64 else None, old_sha=old_sha,
                       outcome=outcome, reason=(reason or None) and reason[:300], job_id=job_id))
