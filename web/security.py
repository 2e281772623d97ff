"""Security headers on every response, request size limits, rate limits per caller, and redacted request logs."""

from __future__ import annotations

import logging
import time

from flask import Flask, g, request, session
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from werkzeug.exceptions import RequestEntityTooLarge

from worker.jobs import fingerprint
from worker.redact import RedactingFilter

log = logging.getLogger("lorafold.web.requests")

CSP = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data:",
    "connect-src 'self'",
    "font-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
])
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=(), usb=(), interest-cohort=()",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
MAX_BODY = 64 * 1024  # JSON API, webhooks and forms are small; nothing here uploads files


def rate_key() -> str:
    """Callers are counted by token fingerprint (API), by session credential (signed-in pages), else by address."""
    from .auth import bearer_token

    token = bearer_token()
    if token and _verified(token):
        return "tok:" + fingerprint(token)
    # An unverified token gets no bucket of its own: rotating made-up tokens must not escape the limit (each would
    # also cost a whoami call to the Hub); such callers are counted by address.
    cred = session.get("cred") if not request.path.startswith("/api/") else None
    if isinstance(cred, str):
        return "cred:" + cred
    return "ip:" + (get_remote_address() or "unknown")


def _verified(token: str) -> bool:
    from .services import services

    try:
        return services().whoami.known(token)
    except Exception:  # noqa: BLE001 - no app context or no cache: count by address
        return False


def init_app(app: Flask, rate_limit: str, storage: str, cookies_secure: bool) -> Limiter:
    app.config.update(
        MAX_CONTENT_LENGTH=MAX_BODY,
        MAX_FORM_MEMORY_SIZE=MAX_BODY,
        MAX_FORM_PARTS=100,  # our forms have at most a dozen fields; Werkzeug answers 413 above this
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=cookies_secure,
        SESSION_COOKIE_NAME="lorafold_session",
        PERMANENT_SESSION_LIFETIME=7 * 24 * 3600,
    )
    limiter = Limiter(
        rate_key,
        app=app,
        storage_uri=storage,
        headers_enabled=True,
        strategy="fixed-window",
        swallow_errors=True,  # a rate-limit store that is down must not take the service down
        key_prefix="lorafold",
    )
    app.extensions["lorafold_limiter"] = limiter

    @app.before_request
    def _start_timer():
        g.started = time.perf_counter()
        length = request.content_length
        if length is not None and length > MAX_BODY:  # refuse before authenticating or reading anything
            raise RequestEntityTooLarge()

    @app.after_request
    def _headers(response):
        for name, value in HEADERS.items():
            response.headers.setdefault(name, value)
        if request.path.startswith(("/api/", "/hooks/")) or request.path.endswith(".json"):
            response.headers.setdefault("Cache-Control", "no-store")
        elif response.mimetype == "text/html":
            response.headers.setdefault("Cache-Control", "no-cache")
        started = g.get("started")
        ms = (time.perf_counter() - started) * 1000 if started else 0.0
        log.info("%s %s %s %.1fms", request.method, request.path, response.status_code, ms)
        return response

    _redact_logs()
    return limiter


UNLIMITED_ENDPOINTS = frozenset({"ui.job_live"})  # the job page polls every second


def apply_limits(limiter: Limiter, rate_limit: str, *blueprints) -> None:
    """One shared budget per caller across the API and the pages."""
    shared = limiter.shared_limit(rate_limit, scope="lorafold",
                                  exempt_when=lambda: request.endpoint in UNLIMITED_ENDPOINTS)
    for bp in blueprints:
        shared(bp)


def limit_public_doors(limiter: Limiter, settings, hooks_bp, health_bp) -> None:
    """The doors without a signed-in caller (issue 10 §2: a rule's webhook took 100 deliveries in 2.5 s).

    Webhook: accepted deliveries count against their rule (the Hub sends from shared addresses, so an
    address budget would let one busy rule starve all others); calls with a wrong secret count against the
    caller's address only, so a stranger can neither use up a rule's budget nor guess secrets quickly.
    /healthz: per address. Everything else is under the shared per-caller budget (`apply_limits`)."""
    def rule_key() -> str:
        return "hook:" + str((request.view_args or {}).get("rule_id", ""))[:64]

    def address_key() -> str:
        return "ip:" + (get_remote_address() or "unknown")

    # Only answers that passed the secret count for the rule (2xx: queued, duplicate or ignored); a refusal
    # (401, or 429 from the address budget, or a 413 before authentication) must not spend it.
    limiter.limit(settings.hook_rate_limit, key_func=rule_key, scope="hook-rule",
                  deduct_when=lambda response: 200 <= response.status_code < 300)(hooks_bp)
    limiter.limit(settings.public_rate_limit, key_func=address_key, scope="hook-denied",
                  deduct_when=lambda response: response.status_code == 401)(hooks_bp)
    limiter.limit(settings.public_rate_limit, key_func=address_key, scope="public")(health_bp)


def _redact_logs() -> None:
    """Request logs (ours and werkzeug's access log) pass through the secret scrubber."""
    for name in ("lorafold.web.requests", "lorafold.web", "werkzeug", "gunicorn.access", "gunicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in logger.filters):
            logger.addFilter(RedactingFilter())
