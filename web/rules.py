"""Automation rules: "merge every new commit of these adapter repos". Shared by the /rules pages and the API.

A rule keeps its owner's current token (`Credential(purpose="rule")`, encrypted) for the merges it triggers, and
a generated webhook secret (encrypted; shown once, when the rule is created). Deleting the rule deletes both.
"""

from __future__ import annotations

import re
import secrets
import string
from dataclasses import dataclass

from flask import Blueprint, make_response, redirect, render_template, url_for
from sqlalchemy import delete, select

from worker.jobs import Credential, Delivery, Rule
from worker.locations import is_repo_id
from worker.redact import register

from .auth import Caller, login_required, session_caller
from .errors import NotFound, Unprocessable
from .forms import DTYPES, ActionForm, RuleForm
from .hubcheck import InspectError, can_write, check_repo_id, check_rev, inspect_repo
from .services import services

bp = Blueprint("rules", __name__)

DEFAULT_TARGET = "{namespace}/{name}-merged"
NAMESPACE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
NAME_GLOB_RE = re.compile(r"^[A-Za-z0-9._*?\[\]-]{1,96}$")
FIELDS = {"watch": str, "target": str, "base": str, "base_revision": str, "private": bool, "dtype": str}
RULE_ID_RE = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class RuleInput:
    watch: str
    target: str = DEFAULT_TARGET
    base: str | None = None
    base_revision: str | None = None
    private: bool = False
    dtype: str = "auto"

    @classmethod
    def from_json(cls, body: object) -> RuleInput:
        if not isinstance(body, dict):
            raise Unprocessable("the request body must be a JSON object")
        for key in body:
            if key not in FIELDS:
                raise Unprocessable(f"unknown field {str(key)[:60]!r}", field=str(key)[:60])
        if "watch" not in body:
            raise Unprocessable("watch is required", field="watch")
        values: dict = {}
        for key, kind in FIELDS.items():
            value = body.get(key)
            if value is None and key != "watch":
                continue
            if kind is bool and not isinstance(value, bool):
                raise Unprocessable(f"{key} must be true or false", field=key)
            if kind is str and not isinstance(value, str):
                raise Unprocessable(f"{key} must be a string", field=key)
            if kind is str and len(value) > 200:
                raise Unprocessable(f"{key} is longer than 200 characters", field=key)
            values[key] = value
        if not values.get("target"):
            values.pop("target", None)
        for key in ("base", "base_revision"):
            if values.get(key) == "":
                values[key] = None
        return cls(**values)

    @classmethod
    def from_form(cls, form: RuleForm) -> RuleInput:
        def text(name):
            return (getattr(form, name).data or "").strip() or None

        return cls(watch=text("watch") or "", target=text("target") or DEFAULT_TARGET, base=text("base"),
                   base_revision=text("base_revision"), private=bool(form.private.data), dtype=form.dtype.data or "auto")


def split_watch(watch: str) -> tuple[str, str] | None:
    namespace, sep, name = watch.partition("/")
    if not sep or not NAMESPACE_RE.match(namespace) or not NAME_GLOB_RE.match(name):
        return None
    if not any(c in name for c in "*?[") and not is_repo_id(watch):
        return None
    return namespace, name


def render_target(template: str, namespace: str, name: str) -> str:
    return template.format(namespace=namespace, name=name)


def check(caller: Caller, inp: RuleInput) -> list[InspectError]:
    errors: list[InspectError] = []
    parts = split_watch(inp.watch)
    if parts is None:
        errors.append(InspectError("watch", f"{inp.watch[:100]!r}: watch one repo (owner/name) or a pattern of one "
                                            "namespace (owner/*, owner/*-lora)"))
    target_ns = _check_template(inp.target, parts[0] if parts else "owner", errors)
    base = None
    if inp.base:
        try:
            base = check_repo_id(inp.base, "base", "base")
        except InspectError as exc:
            errors.append(exc)
    try:
        base_rev = check_rev(inp.base_revision, "base_revision", "base revision")
    except InspectError as exc:
        errors.append(exc)
        base_rev = None
    if inp.dtype not in DTYPES:
        errors.append(InspectError("dtype", f"dtype must be one of {', '.join(DTYPES)}"))
    if errors:
        return errors
    if target_ns and not can_write(caller.identity, target_ns):
        errors.append(InspectError("target", f"you cannot create repos in '{target_ns}' with this token"))
    if base:
        try:
            inspect_repo(services().hub(caller.token), base, base_rev, field="base", revision_field="base_revision")
        except InspectError as exc:
            errors.append(exc)
    return errors


def _check_template(template: str, namespace: str, errors: list[InspectError]) -> str | None:
    try:
        fields = {f for _, f, spec, conv in string.Formatter().parse(template) if f is not None}
        bad = fields - {"namespace", "name"}
        if bad or any(spec or conv for _, f, spec, conv in string.Formatter().parse(template) if f is not None):
            raise ValueError(f"unknown placeholder {{{sorted(bad)[0] if bad else '...'}}}")
        if "{name}" in template.partition("/")[0]:
            raise ValueError("the target's namespace may use {namespace} but not {name}")
        rendered = render_target(template, namespace, "example")
    except (ValueError, IndexError, KeyError) as exc:
        errors.append(InspectError("target", f"target template {template[:100]!r}: {exc}; use e.g. {DEFAULT_TARGET}"))
        return None
    if not is_repo_id(rendered):
        errors.append(InspectError("target", f"target template {template[:100]!r} does not give a repo id "
                                             f"(it gives {rendered[:100]!r}); use e.g. {DEFAULT_TARGET}"))
        return None
    return rendered.split("/")[0]


def create(caller: Caller, inp: RuleInput) -> tuple[Rule, str]:
    """Check, store the owner's token and a new secret; returns the rule and the secret (shown once)."""
    errors = check(caller, inp)
    if errors:
        raise errors[0]
    svc = services()
    secret = secrets.token_urlsafe(32)
    register(secret)
    with svc.db.session() as s:
        cred = Credential(owner=caller.name, purpose="rule", token_encrypted=svc.box.seal(caller.token))
        s.add(cred)
        s.flush()
        rule = Rule(owner=caller.name, watch=inp.watch, target=inp.target, base=inp.base, base_revision=inp.base_revision,
                    private=inp.private, dtype=inp.dtype, secret_encrypted=svc.box.seal(secret), credential_id=cred.id)
        s.add(rule)
    return rule, secret


def owned(caller: Caller) -> list[Rule]:
    with services().db.session() as s:
        return list(s.scalars(select(Rule).where(Rule.owner == caller.name).order_by(Rule.created_at.desc(), Rule.id)))


def get(caller: Caller, rule_id: str) -> Rule:
    if not RULE_ID_RE.match(rule_id or ""):
        raise NotFound("no such rule")
    with services().db.session() as s:
        rule = s.scalar(select(Rule).where(Rule.id == rule_id, Rule.owner == caller.name))
    if rule is None:
        raise NotFound("no such rule")
    return rule


def remove(caller: Caller, rule_id: str) -> None:
    rule = get(caller, rule_id)
    with services().db.session() as s:
        s.execute(delete(Delivery).where(Delivery.rule_id == rule.id))
        s.execute(delete(Rule).where(Rule.id == rule.id))
        if rule.credential_id:
            s.execute(delete(Credential).where(Credential.id == rule.credential_id))


def deliveries(rule_id: str, limit: int = 50) -> list[Delivery]:
    with services().db.session() as s:
        return list(s.scalars(select(Delivery).where(Delivery.rule_id == rule_id)
                              .order_by(Delivery.id.desc()).limit(limit)))


# --- pages --------------------------------------------------------------------------------------------------------


def _page(form: RuleForm, created: tuple[Rule, str] | None = None, status: int = 200):
    caller = session_caller()
    rules = [(rule, deliveries(rule.id, 20)) for rule in owned(caller)]
    response = make_response(render_template("rules.html", form=form, rules=rules, created=created,
                                             action=ActionForm(), default_target=DEFAULT_TARGET), status)
    if created:
        response.headers["Cache-Control"] = "no-store"  # the secret is on this page, once
    return response


@bp.get("/rules")
@login_required
def rules_page():
    """Your automation rules, their webhook URLs and run history."""
    return _page(RuleForm())


@bp.post("/rules")
@login_required
def create_rule():
    """Create a rule; the page shows its webhook URL and secret once."""
    form = RuleForm()
    if not form.validate_on_submit():
        return _page(form, status=422)
    inp = RuleInput.from_form(form)
    errors = check(session_caller(), inp)
    if errors:
        for err in errors:
            getattr(form, err.field, form.watch).errors.append(err.message)
        return _page(form, status=422)
    created = create(session_caller(), inp)
    return _page(RuleForm(formdata=None), created=created, status=201)


@bp.post("/rules/<rule_id>/delete")
@login_required
def delete_rule(rule_id: str):
    """Delete a rule (and the token it kept)."""
    remove(session_caller(), rule_id)
    return redirect(url_for("rules.rules_page"))
