"""lorafold's HTTP doors: the pages (form, jobs, rules), the JSON API v1, and the Hub webhook receiver.

`create_app(settings)` builds everything; importing this package does nothing (no settings read, no connection,
no Celery app). The web never imports torch or the engine's execution code: it checks requests, writes job rows
through `worker.jobs.submit()` and sends job ids to the queue by task name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flask import Flask

    from worker.hub import HubClient
    from worker.settings import Settings


def create_app(
    settings: Settings | None = None,
    *,
    enqueue: Callable[[str], None] | None = None,
    hub_factory: Callable[[str | None], HubClient] | None = None,
) -> Flask:
    """The Flask app. `enqueue` (job id → broker) and `hub_factory` (token → HubClient) are injectable for tests."""
    from flask import Flask
    from flask_wtf.csrf import CSRFProtect

    from worker.jobs import Database, JobStore, SecretBox
    from worker.settings import Settings

    from . import api, auth, errors, health, hooks, metrics, present, rules, security, ui
    from .services import Services, celery_enqueue, default_hub_factory

    settings = settings if settings is not None else Settings.from_env()
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=_session_key(settings.secret_key),
        WTF_CSRF_TIME_LIMIT=None,  # tied to the session instead: a form left open for hours still submits
    )
    app.json.sort_keys = False
    db = Database(settings.database_url)
    box = SecretBox(settings.secret_key)
    hub_factory = hub_factory or default_hub_factory(settings)
    svc = Services(settings=settings, db=db, box=box, store=JobStore(db, box), enqueue=enqueue or celery_enqueue(settings),
                   hub_factory=hub_factory)
    svc.whoami = auth.WhoamiCache(settings.whoami_ttl, hub_factory)
    app.extensions["lorafold"] = svc

    limiter = security.init_app(app, settings.rate_limit, settings.rate_limit_storage, settings.cookies_secure)
    csrf = CSRFProtect(app)
    for bp in (auth.bp, ui.bp, rules.bp, api.bp, hooks.bp, health.bp, metrics.bp):
        app.register_blueprint(bp)
    csrf.exempt(api.bp)  # Bearer tokens only: a browser cannot be tricked into sending one
    csrf.exempt(hooks.bp)  # authenticated by the rule's secret
    security.apply_limits(limiter, settings.rate_limit, api.bp, auth.bp, rules.bp, ui.bp)
    security.limit_public_doors(limiter, settings, hooks.bp, health.bp)
    auth.init_oauth(app)
    errors.register(app)

    @app.context_processor
    def _template_globals():
        try:
            caller = auth.session_caller()
        except Exception:  # noqa: BLE001 - an error page must render even when the database is down
            caller = None
        return {"caller": caller, "oauth_enabled": bool(settings.oauth_client_id), "webhook_url": present.webhook_url}

    return app


def _session_key(secret_key: str) -> bytes:
    """The session-signing key is derived from LORAFOLD_SECRET_KEY, distinct from the token-encryption key."""
    import hashlib
    import hmac

    return hmac.new(secret_key.encode(), b"lorafold flask session v1", hashlib.sha256).digest()
