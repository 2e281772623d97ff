"""Automation rules: "merge every new commit of these adapter repos". Shared by the /rules pages and the API.

A rule acts for its owner, with the owner's stored token, on pushes somebody else may make, so everything it
reads and writes is fixed by the owner when the rule is made (issue 10 §2):
- the base: one repo (+ revision), or an allow-list (`bases`); a pushed adapter_config.json is only *checked*
  against the list, never followed, and a private or gated base makes the output private (worker/service/pipeline.py);
- the target: a template that cannot render to a watched repo nor to a base (web/rule_targets.py proves it for
  every name the watch pattern admits); the worker writes only to a repo that does not exist yet or carries this
  rule's marker in its history (worker/hub/sink.py);
- the token: a personal access token. "Sign in with Hugging Face" tokens expire after 8 hours and their refresh
  tokens rotate on every use (service-anchors.md (e) 8, Step 0'), so keeping one alive would mean every worker
  racing to swap the stored refresh token, with the OAuth app's client secret in every worker; the Hub's own
  automation (webhooks, Spaces, CI) runs on user access tokens instead, which last until revoked. An OAuth caller
  gives one in `token`; its expiry, when the Hub reports one, is kept and warned about (`credential_warning`).
Ownership is the Hub's stable user id, never the name (renames). The secret is generated, encrypted, shown once.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from flask import Blueprint, make_response, redirect, render_template, url_for
from sqlalchemy import and_, delete, or_, select

from worker.jobs import Credential, Delivery, Rule
from worker.jobs.models import utcnow
from worker.jobs.request import FORMATS, FROM_QUANTIZED, formats_problem
from worker.locations import is_repo_id
from worker.redact import register

from .auth import Caller, identify, login_required, session_caller
from .errors import HubUnavailable, NotFound
from .forms import DTYPES, FORMAT_CHOICES, ActionForm, RuleForm
from .hubcheck import Identity, InspectError, can_write, check_repo_id, check_rev, inspect_repo
from .preflight import base_gguf_preview, quantized_base
from .rule_targets import DEFAULT_TARGET, parse_template, render_target, split_watch, target_collision
from .schemas import RuleCreate, parse
from .services import services

bp = Blueprint("rules", __name__)

RULE_ID_RE = re.compile(r"^[0-9a-f]{32}$")
EXPIRY_WARNING = timedelta(days=7)

__all__ = ["DEFAULT_TARGET", "RULE_ID_RE", "RuleInput", "render_target", "split_watch"]


@dataclass(frozen=True)
class RuleInput:
    watch: str
    target: str = DEFAULT_TARGET
    base: str | None = None
    base_revision: str | None = None
    bases: tuple[str, ...] | None = None
    private: bool = False
    dtype: str = "auto"
    from_quantized: str = "original"  # stored for the rule's jobs, which dequantize a bitsandbytes base either way
    keep_quantization: bool = False
    formats: tuple[str, ...] = ("safetensors",)  # the jobs' output formats (request.FORMATS order)
    gguf_outtype: str = "f16"
    token: str | None = field(default=None, repr=False)  # a personal access token for the rule (never printed)
    recipe: object = None  # a recipe rule (web/recipes.py check_rule): YAML text or a mapping, normalised there

    @classmethod
    def from_json(cls, body: object) -> RuleInput:
        """Strict: web/schemas.py RuleCreate (the model openapi.py publishes); 422 naming the field otherwise."""
        values = parse(RuleCreate, body).model_dump()
        values["bases"] = tuple(values["bases"]) if values["bases"] is not None else None
        values["watch"] = values["watch"] or ""
        values["formats"] = tuple(f for f in FORMATS if f in values["formats"])
        return cls(**values)

    @classmethod
    def from_form(cls, form: RuleForm) -> RuleInput:
        def text(name):
            return (getattr(form, name).data or "").strip() or None

        bases = tuple(b for b in re.split(r"[\s,]+", text("bases") or "") if b) or None
        return cls(watch=text("watch") or "", target=text("target") or DEFAULT_TARGET, base=text("base"),
                   base_revision=text("base_revision"), bases=bases, private=bool(form.private.data),
                   dtype=form.dtype.data or "auto", keep_quantization=bool(form.keep_quantization.data),
                   token=text("token"), recipe=text("recipe"),
                   formats=FORMAT_CHOICES.get(form.formats.data or "safetensors", ("?",)),
                   gguf_outtype=form.gguf_outtype.data or "f16")


@dataclass(frozen=True)
class Checked:
    """A rule that passed every check: the token it will keep and who that token is."""

    token: str
    identity: Identity
    target_namespace: str
    recipe: str | None = None  # a recipe rule's normalised recipe
    watch: str | None = None  # a recipe rule's adapters, as shown

    def __repr__(self) -> str:  # never the token
        return f"Checked({self.identity.name!r}, {self.target_namespace!r})"


def check(caller: Caller, inp: RuleInput) -> list[InspectError]:
    return _check(caller, inp)[0]


def _check(caller: Caller, inp: RuleInput) -> tuple[list[InspectError], Checked | None]:
    problem = formats_problem(inp.formats, inp.gguf_outtype, keep_quantization=inp.keep_quantization)
    if problem is not None:
        return [InspectError(*problem)], None
    if inp.recipe is not None:
        from . import recipes

        return recipes.check_rule(caller, inp, _rule_token)
    errors: list[InspectError] = []
    parts = split_watch(inp.watch)
    if not inp.watch:
        errors.append(InspectError("watch", "watch is required (owner/name or owner/*), or give a recipe"))
    elif parts is None:
        errors.append(InspectError("watch", f"{inp.watch[:100]!r}: watch one repo (owner/name) or a pattern of one "
                                            "namespace (owner/*, owner/*-lora)"))
    bases = _check_bases(inp, errors)
    try:
        base_rev = check_rev(inp.base_revision, "base_revision", "base revision")
    except InspectError as exc:
        errors.append(exc)
        base_rev = None
    target_ns = None
    if parts is not None:
        target_ns = _check_template(inp, parts[0], bases, errors)
    if inp.dtype not in DTYPES:
        errors.append(InspectError("dtype", f"dtype must be one of {', '.join(DTYPES)}"))
    if inp.from_quantized not in FROM_QUANTIZED:
        errors.append(InspectError("from_quantized", f"from_quantized must be one of {', '.join(FROM_QUANTIZED)}"))
    if errors:
        return errors, None
    token, identity = _rule_token(caller, inp, errors)
    if errors:
        return errors, None
    if target_ns and not can_write(identity, target_ns):
        errors.append(InspectError("target", f"you cannot create repos in '{target_ns}' with this token"))
    hub = services().hub(token)
    for base in bases:
        try:  # the rule's token must be able to read every base it names (and nothing else is read later)
            info = inspect_repo(hub, base, base_rev if inp.base else None, field="base" if inp.base else "bases",
                                revision_field="base_revision")
            # a scheme lorafold cannot read, or keep_quantization on a base that is not FP8, would fail every push
            quant = quantized_base(hub, base, info.sha, from_config=False, from_quantized="dequantize",
                                   keep_quantization=inp.keep_quantization)
            # an architecture or tokenizer llama.cpp cannot take would fail every push (a quantized base's packed
            # headers are laid out by the worker, after dequantizing)
            if "gguf" in inp.formats and quant is None:
                base_gguf_preview(hub, base, info.sha, inp.gguf_outtype)
        except InspectError as exc:
            errors.append(exc if exc.field != "base" or inp.base else InspectError("bases", exc.message))
    return errors, (None if errors else Checked(token, identity, target_ns or ""))


def _check_bases(inp: RuleInput, errors: list[InspectError]) -> tuple[str, ...]:
    """The bases the owner chose: `base` (one) or `bases` (an allow-list), exactly one of the two."""
    if inp.base and inp.bases:
        errors.append(InspectError("bases", "give either base (one base for every push) or bases (an allow-list), "
                                            "not both"))
        return ()
    if not inp.base and not inp.bases:
        errors.append(InspectError("base", "a rule needs its base: base (one repo) or bases (the repos an adapter's "
                                           "config may name); a pushed adapter config never chooses it"))
        return ()
    if inp.bases and inp.base_revision:
        errors.append(InspectError("base_revision", "base_revision goes with base, not with bases"))
    out: list[str] = []
    for value, name in ((inp.base, "base"),) if inp.base else ((b, "bases") for b in inp.bases or ()):
        try:
            repo = check_repo_id(value, name, name)
        except InspectError as exc:
            errors.append(exc)
            continue
        if repo.lower() not in {b.lower() for b in out}:
            out.append(repo)
    return tuple(out)


def _check_template(inp: RuleInput, namespace: str, bases: tuple[str, ...], errors: list[InspectError]) -> str | None:
    template = inp.target
    try:
        parsed = parse_template(template, namespace)
        rendered = parsed.render("example")
    except (ValueError, IndexError, KeyError) as exc:
        errors.append(InspectError("target", f"target template {template[:100]!r}: {exc}; use e.g. {DEFAULT_TARGET}"))
        return None
    if not is_repo_id(rendered):
        errors.append(InspectError("target", f"target template {template[:100]!r} does not give a repo id "
                                             f"(it gives {rendered[:100]!r}); use e.g. {DEFAULT_TARGET}"))
        return None
    collision = target_collision(inp.watch, parsed, bases)
    if collision:
        errors.append(InspectError("target", f"target template {template[:100]!r}: {collision}"))
        return None
    return parsed.namespace


def _rule_token(caller: Caller, inp: RuleInput, errors: list[InspectError]) -> tuple[str, Identity]:
    """The personal access token the rule will keep: `token` when given (it must be the caller's own), else the
    caller's, unless that is an expiring OAuth sign-in token (see the module's docstring)."""
    if inp.token:
        identity = identify(inp.token)
        if identity is None:
            errors.append(InspectError("token", "the Hugging Face Hub does not accept this token"))
        elif identity.id != caller.id:
            errors.append(InspectError("token", "this token belongs to another Hugging Face account"))
        elif _is_oauth(identity, inp.token):
            errors.append(InspectError("token", "this is a sign-in (OAuth) token, which expires after 8 hours; "
                                                "give a personal access token"))
        return inp.token, identity or caller.identity
    if _is_oauth(caller.identity, caller.token):
        errors.append(InspectError("token", "rules keep a personal access token (hf_..., with write access): "
                                            "'Sign in with Hugging Face' tokens expire after 8 hours; create one "
                                            "at huggingface.co/settings/tokens and give it in the token field"))
    return caller.token, caller.identity


def _is_oauth(identity: Identity, token: str) -> bool:
    """An OAuth access token: whoami says so (`auth.type`), or it has the Hub's `hf_oauth_` prefix."""
    return identity.token_kind == "oauth" or token.startswith("hf_oauth_")


def create(caller: Caller, inp: RuleInput) -> tuple[Rule, str]:
    """Check, store the owner's token and a new secret; returns the rule and the secret (shown once)."""
    errors, checked = _check(caller, inp)
    if errors:
        raise errors[0]
    assert checked is not None
    svc = services()
    secret = secrets.token_urlsafe(32)
    register(secret)
    register(checked.token)
    identity = checked.identity
    with svc.db.session() as s:
        cred = Credential(owner=identity.name, owner_id=identity.id, purpose="rule",
                          token_encrypted=svc.box.seal(checked.token), expires_at=_parse_time(identity.token_expires_at))
        s.add(cred)
        s.flush()
        rule = Rule(owner=caller.name, owner_id=caller.id, watch=checked.watch or inp.watch, target=inp.target,
                    target_namespace_id=identity.namespace_id(checked.target_namespace), base=inp.base,
                    base_revision=inp.base_revision if inp.base else None,
                    bases=list(_check_bases(inp, [])) if inp.bases else None, private=inp.private, dtype=inp.dtype,
                    from_quantized=inp.from_quantized, keep_quantization=inp.keep_quantization,
                    formats=",".join(inp.formats), gguf_outtype=inp.gguf_outtype,
                    recipe=checked.recipe, secret_encrypted=svc.box.seal(secret), credential_id=cred.id)
        s.add(rule)
    return rule, secret


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment.replace(tzinfo=None) - (moment.utcoffset() or timedelta(0))


def _candidates(caller: Caller):
    """This account's rules by its stable id, and rows from before ids were stored (migration 0002) that carry its
    name; those are shown only once `_adopt` has proven them the caller's."""
    return or_(Rule.owner_id == caller.id, and_(Rule.owner_id.is_(None), Rule.owner == caller.name))


def _adopt(caller: Caller, rules: list[Rule]) -> list[Rule]:
    """Keep a row without an owner id only when the token it stores still belongs to the caller's Hub id (then the
    id is recorded): a newcomer who took a renamed user's old name gets none of that user's rules."""
    out = []
    for rule in rules:
        if rule.owner_id is None:
            if _stored_token_owner(rule) != caller.id:
                continue
            with services().db.session() as s:
                s.get(Rule, rule.id).owner_id = caller.id
            rule.owner_id = caller.id
        out.append(rule)
    return out


def _stored_token_owner(rule: Rule) -> str | None:
    svc = services()
    with svc.db.session() as s:
        cred = s.get(Credential, rule.credential_id) if rule.credential_id else None
        sealed = cred.token_encrypted if cred is not None else None
    try:
        identity = identify(svc.box.open(sealed)) if sealed else None
    except ValueError:
        return None
    return identity.id if identity is not None else None


def owned(caller: Caller) -> list[Rule]:
    if not caller.id:
        return []
    with services().db.session() as s:
        rows = list(s.scalars(select(Rule).where(_candidates(caller)).order_by(Rule.created_at.desc(), Rule.id)))
    return _adopt(caller, rows)


def get(caller: Caller, rule_id: str) -> Rule:
    if not RULE_ID_RE.match(rule_id or "") or not caller.id:
        raise NotFound("no such rule")
    with services().db.session() as s:
        rule = s.scalar(select(Rule).where(Rule.id == rule_id, _candidates(caller)))
    if rule is None or not _adopt(caller, [rule]):
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


def credential_warning(rule: Rule, now: datetime | None = None) -> str | None:
    """A warning when the rule's stored token is gone, expired, expires within a week, is an expiring sign-in
    token (rules made before personal tokens were required), or is no longer accepted by the Hub (revoked). The
    Hub is asked through the whoami cache, so a page of rules costs at most one whoami per rule per TTL."""
    if not rule.credential_id:
        return "this rule has no stored token any more: delete it and create it again"
    svc = services()
    with svc.db.session() as s:
        cred = s.get(Credential, rule.credential_id)
        sealed, expires = (cred.token_encrypted, cred.expires_at) if cred is not None else (None, None)
    if sealed is None:
        return "this rule has no stored token any more: delete it and create it again"
    now = now or utcnow()
    if expires is not None:
        when = expires.strftime("%Y-%m-%d %H:%M UTC")
        if expires <= now:
            return f"the token this rule keeps expired on {when}: its merges fail; create the rule again with a new token"
        if expires - now <= EXPIRY_WARNING:
            return f"the token this rule keeps expires on {when}; create the rule again with a new token before then"
    try:
        token = svc.box.open(sealed)
        identity = identify(token)
    except ValueError:
        return "the token this rule keeps cannot be decrypted (was LORAFOLD_SECRET_KEY changed?): create the rule again"
    except HubUnavailable:
        return None  # cannot tell now; no false alarm
    if identity is None:
        return ("the Hugging Face Hub no longer accepts the token this rule keeps (revoked or expired): its merges "
                "fail; create the rule again with a new token")
    if _is_oauth(identity, token):
        return ("this rule keeps a 'Sign in with Hugging Face' token, which expires after 8 hours: create the rule "
                "again with a personal access token")
    return None


# --- pages --------------------------------------------------------------------------------------------------------


def _page(form: RuleForm, created: tuple[Rule, str] | None = None, status: int = 200):
    caller = session_caller()
    rules = [(rule, deliveries(rule.id, 20), credential_warning(rule)) for rule in owned(caller)]
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
