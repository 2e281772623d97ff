"""Who is calling: a Hub token, verified with the Hub's whoami, from a Bearer header (API) or the session (pages).

- The API takes `Authorization: Bearer <token>` only (never the session cookie, so it needs no CSRF token).
- Pages use a session: pasting a token, or "Sign in with Hugging Face" (OAuth, PKCE S256) when configured. The
  token is stored encrypted in a `Credential(purpose="session")`; the signed session cookie holds only the
  credential id and the user name. Logging out deletes the credential.
- whoami answers are cached for `whoami_ttl` seconds under the token's fingerprint (never the token itself).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from functools import wraps
from urllib.parse import urlsplit

from flask import Blueprint, current_app, g, redirect, render_template, request, session, url_for
from sqlalchemy import delete

from worker.jobs import Credential, fingerprint
from worker.jobs.models import utcnow

from .errors import HubUnavailable, Unauthorized, wants_json
from .forms import TokenForm
from .hubcheck import Identity
from .services import services

bp = Blueprint("auth", __name__)

MAX_TOKEN_CHARS = 512


@dataclass(frozen=True)
class Caller:
    """A verified caller: their Hub identity, their token (kept in memory only), the session credential if any."""

    identity: Identity
    token: str
    credential_id: str | None = None

    @property
    def name(self) -> str:
        """The Hub user name: for display and Hub URLs; never what access is decided on (see `id`)."""
        return self.identity.name

    @property
    def id(self) -> str:
        """The Hub's stable user id (survives renames): what owns rules, jobs and stored tokens."""
        return self.identity.id

    @property
    def namespace_ids(self) -> frozenset[str]:
        return self.identity.namespace_ids

    @property
    def namespaces(self) -> frozenset[str]:
        return self.identity.namespaces

    def __repr__(self) -> str:  # never the token
        return f"Caller({self.name!r})"


class WhoamiCache:
    """token fingerprint → (expires, Identity | None). Rejected tokens are remembered too (None), so a client
    hammering with a revoked token does not hammer the Hub's strictly rate-limited whoami."""

    def __init__(self, ttl: int, hub_factory):
        self.ttl = ttl
        self.hub_factory = hub_factory
        self._entries: dict[str, tuple[float, Identity | None]] = {}
        self._lock = threading.Lock()

    def known(self, token: str) -> bool:
        entry = self._entries.get(fingerprint(token))
        return entry is not None and entry[1] is not None and entry[0] > time.monotonic()

    def identify(self, token: str) -> Identity | None:
        key = fingerprint(token)
        now = time.monotonic()
        entry = self._entries.get(key)
        if entry is not None and entry[0] > now:
            return entry[1]
        identity = self._ask_hub(token)
        with self._lock:
            if len(self._entries) >= 10_000:  # bounded: drop what has expired, everything if that is not enough
                self._entries = {k: v for k, v in self._entries.items() if v[0] > now}
                if len(self._entries) >= 10_000:
                    self._entries.clear()
            self._entries[key] = (now + self.ttl, identity)
        return identity

    def forget(self, token: str) -> None:
        with self._lock:
            self._entries.pop(fingerprint(token), None)

    def _ask_hub(self, token: str) -> Identity | None:
        from worker.hub.errors import status_of

        try:
            info = self.hub_factory(token).whoami()
        except Exception as exc:  # noqa: BLE001 - classified below
            if status_of(exc) in (401, 403):
                return None
            raise HubUnavailable("cannot reach the Hugging Face Hub to verify the token; try again shortly") from None
        try:
            return Identity.from_whoami(info)
        except (ValueError, TypeError, AttributeError):
            return None


def _plausible(token: str) -> bool:
    return 0 < len(token) <= MAX_TOKEN_CHARS and token.isascii() and token.isprintable() and " " not in token


def identify(token: str) -> Identity | None:
    if not _plausible(token):
        return None
    return services().whoami.identify(token)


def bearer_token() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None


def api_caller() -> Caller:
    """The API's caller (Bearer token), or 401."""
    caller = g.get("api_caller")
    if caller is not None:
        return caller
    token = bearer_token()
    if token is None:
        raise Unauthorized("missing token: send an Authorization header with your Hugging Face token (Bearer scheme)")
    identity = identify(token)
    if identity is None:
        raise Unauthorized("the Hugging Face Hub does not accept this token")
    g.api_caller = Caller(identity, token)
    return g.api_caller


def session_caller() -> Caller | None:
    """The signed-in user of the pages (or None). A session whose token the Hub no longer accepts is ended."""
    if "caller" in g:
        return g.caller
    g.caller = None
    cred_id = session.get("cred")
    if not isinstance(cred_id, str):
        return None
    svc = services()
    with svc.db.session() as s:
        cred = s.get(Credential, cred_id)
        sealed = cred.token_encrypted if cred is not None and cred.purpose == "session" else None
        expired = cred is not None and cred.expires_at is not None and cred.expires_at < utcnow()
    if sealed is None or expired:
        session.clear()
        return None
    try:
        token = svc.box.open(sealed)
    except ValueError:
        session.clear()
        return None
    identity = identify(token)
    if identity is None:
        _drop_credential(cred_id)
        session.clear()
        return None
    g.caller = Caller(identity, token, cred_id)
    return g.caller


def login_required(view):
    @wraps(view)
    def wrapper(*args, **kwargs):
        if session_caller() is None:
            if request.method == "GET" and not wants_json():
                return redirect(url_for("auth.login", next=request.full_path.rstrip("?")))
            raise Unauthorized("sign in first")
        return view(*args, **kwargs)

    return wrapper


def start_session(token: str, identity: Identity, expires_in: int | None = None) -> None:
    """Store the token encrypted and put only its credential id (and the user name) in the session cookie.

    The stored token lives as long as the session cookie (or the OAuth token, when shorter); expired session
    credentials of anyone are deleted here, so tokens of people who never signed out do not pile up."""
    svc = services()
    old = session.get("cred")
    lifetime = int(current_app.permanent_session_lifetime.total_seconds())
    now = utcnow()
    expires = now + timedelta(seconds=min(expires_in or lifetime, lifetime))
    with svc.db.session() as s:
        s.execute(delete(Credential).where(Credential.purpose == "session", Credential.expires_at < now))
        cred = Credential(owner=identity.name, owner_id=identity.id, purpose="session",
                          token_encrypted=svc.box.seal(token), expires_at=expires)
        s.add(cred)
        s.flush()
        cred_id = cred.id
    if isinstance(old, str):
        _drop_credential(old)
    session.clear()
    session.permanent = True
    session["cred"] = cred_id
    session["user"] = identity.name


def _drop_credential(cred_id: str) -> None:
    with services().db.session() as s:
        s.execute(delete(Credential).where(Credential.id == cred_id, Credential.purpose == "session"))


def safe_next(target: str | None) -> str:
    """Only same-site paths: never redirect to another host after sign-in."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return url_for("ui.index")
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return url_for("ui.index")
    return target


# --- routes -------------------------------------------------------------------------------------------------------


@bp.route("/login", methods=["GET", "POST"])
def login():
    """Sign in by pasting a Hugging Face token (or with Hugging Face, when OAuth is configured)."""
    form = TokenForm()
    next_url = safe_next(request.values.get("next"))
    if form.validate_on_submit():
        token = form.token.data.strip()
        identity = identify(token)
        if identity is None:
            form.token.errors.append("the Hugging Face Hub does not accept this token")
        else:
            start_session(token, identity)
            return redirect(next_url)
    oauth_enabled = bool(services().settings.oauth_client_id)
    return render_template("login.html", form=form, next_url=next_url, oauth_enabled=oauth_enabled), (
        422 if form.errors else 200)


@bp.route("/logout", methods=["GET", "POST"])
def logout():
    """Sign out: the stored token is deleted."""
    if request.method == "GET":
        return render_template("logout.html")
    cred_id = session.get("cred")
    if isinstance(cred_id, str):
        _drop_credential(cred_id)
    session.clear()
    return redirect(url_for("ui.index"))


@bp.route("/login/huggingface")
def oauth_login():
    """Start "Sign in with Hugging Face" (authorization code + PKCE S256)."""
    client = _oauth_client()
    session["oauth_next"] = safe_next(request.args.get("next"))
    return client.authorize_redirect(services().url(url_for("auth.oauth_callback")))


@bp.route("/auth/callback")
def oauth_callback():
    """The Hub sends the browser back here with a code; exchange it for an access token."""
    client = _oauth_client()
    if request.args.get("error"):
        return render_template("login.html", form=TokenForm(), next_url=url_for("ui.index"),
                               oauth_enabled=True, oauth_error="Hugging Face sign-in was cancelled or refused"), 401
    try:
        token = client.authorize_access_token()
    except Exception as exc:  # noqa: BLE001 - bad state, replayed code, Hub down: one message, no details
        current_app.logger.warning("oauth callback failed: %s", type(exc).__name__)
        return render_template("login.html", form=TokenForm(), next_url=url_for("ui.index"), oauth_enabled=True,
                               oauth_error="Hugging Face sign-in failed; please try again"), 401
    access = token.get("access_token") if isinstance(token, dict) else None
    identity = identify(access) if access else None
    if identity is None:
        return render_template("login.html", form=TokenForm(), next_url=url_for("ui.index"), oauth_enabled=True,
                               oauth_error="Hugging Face did not give a usable token"), 401
    next_url = session.pop("oauth_next", None)
    expires_in = token.get("expires_in")
    start_session(access, identity, expires_in if isinstance(expires_in, int) else None)
    return redirect(safe_next(next_url))


def _oauth_client():
    from .errors import NotFound

    client = current_app.extensions.get("lorafold_oauth")
    if client is None:
        raise NotFound("sign-in with Hugging Face is not configured on this server")
    return client


def init_oauth(app) -> None:
    """Register the Hugging Face OAuth client when OAUTH_CLIENT_ID is set (metadata is fetched on first use)."""
    settings = app.extensions["lorafold"].settings
    if not settings.oauth_client_id:
        return
    from authlib.integrations.flask_client import OAuth

    oauth = OAuth(app)
    client = oauth.register(
        "huggingface",
        client_id=settings.oauth_client_id,
        client_secret=settings.oauth_client_secret or None,
        server_metadata_url=f"{settings.hf_endpoint.rstrip('/')}/.well-known/openid-configuration",
        client_kwargs={"scope": settings.oauth_scopes, "code_challenge_method": "S256"},
    )
    app.extensions["lorafold_oauth"] = client
